//! Issue 5, end to end through the binary, as a user runs it: the train step
//! really learns (two phantoms, and a real CT with TotalSegmentator's labels,
//! memorised), `tsdistill predict` puts the labels
//! back on the organs of the original grid, and scoring weak labels without a
//! model gives exactly what scoring the model gives.
//!
//! These are the slow tests of the suite (CPU training: ~17 and ~33 minutes
//! of 2 cores), so the configurations are the smallest that still prove the
//! point: feature size 12, one 64×64×32 patch per iteration, data resampled
//! coarse enough that a patch holds most of a case. The real-CT test also
//! covers the TotalSegmentator path: case-command → totalseg-labels.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tsdistill::train::metrics::dice_per_class;
use tsdistill::volume::phantom::BTCV_ORGANS;
use tsdistill::volume::{nifti, orientation, Volume};

fn workspace(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tsdistill-learn-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tsdistill(root: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_tsdistill"))
        .args(args)
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tsdistill {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `tsdistill predict MODEL INPUT OUTPUT --device cpu`.
fn predict(root: &Path, model: &Path, input: &Path, output: &Path) {
    tsdistill(
        root,
        &[
            "predict",
            model.to_str().unwrap(),
            input.to_str().unwrap(),
            output.to_str().unwrap(),
            "--device",
            "cpu",
        ],
    );
}

/// One row of an evaluate step's per_case.csv.
struct Row {
    case: String,
    class: usize,
    dice: f64,
    ref_mm3: f64,
}

fn per_case(step_dir: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(step_dir.join("per_case.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (c, k, d, r) = (
        col("case"),
        col("class"),
        col("dice"),
        col("ref_volume_mm3"),
    );
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Row {
                case: f[c].to_string(),
                class: f[k].parse().unwrap(),
                dice: f[d].parse().unwrap_or(f64::NAN),
                ref_mm3: f[r].parse().unwrap(),
            }
        })
        .collect()
}

fn metrics(step_dir: &Path) -> BTreeMap<String, f64> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(step_dir.join("metrics.json")).unwrap())
            .unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
        .collect()
}

fn labels(v: &Volume) -> Vec<u8> {
    v.data.to_labels().iter().map(|&x| x as u8).collect()
}

/// Iterations and AdamW learning rate of the memorisation runs. MONAI's
/// SwinUNETR learns at the same pace on these cases
/// (benches/train_convergence_peer.py, lr 1e-3: mean foreground Dice 0.07
/// after 50 iterations, 0.43 after 200; ours 0.09 after 50); 3e-3 brings the
/// large organs above 0.9 within about 200 iterations (250 for margin), which
/// a 2-core CI affords.
/// The small organs (under ~700 voxels at 4.8 mm) need far longer.
const OVERFIT_ITERATIONS: usize = 250;
const OVERFIT_LR: f64 = 3e-3;

#[test]
fn r5_overfit_two_phantoms_predict_and_weak_labels() {
    let root = workspace("overfit");
    let spacing = [4.8, 4.8, 5.4];
    let yaml = format!(
        r#"
name: overfit
steps:
  ct: {{kind: phantom, count: 2, seed: 3}}
  prep: {{kind: resample, input: ct, spacing: {spacing:?}}}
  fit:
    kind: train
    data: prep
    model: {{feature_size: 12, out_channels: 14}}
    roi: [64, 64, 32]
    samples_per_volume: 1
    iterations: {OVERFIT_ITERATIONS}
    val_every: 0
    lr: {OVERFIT_LR}
    aug: {{flip_prob: [0, 0, 0], rot90_prob: 0, shift_prob: 0}}
    seed: 0
    device: cpu
  score: {{kind: evaluate, data: prep, model: fit}}
  weak: {{kind: weak-label, input: prep, model: fit}}
  weak_quality: {{kind: evaluate, data: prep, predictions: weak}}
"#
    );
    std::fs::write(root.join("p.yaml"), yaml).unwrap();
    tsdistill(&root, &["run", "p.yaml", "--quiet"]);
    let runs = root.join("runs/overfit");

    // Memorised: mean Dice over every (case, organ) of at least 1000 voxels
    // at training resolution. All 13 organs are printed.
    let voxel_mm3: f64 = spacing.iter().product();
    let rows = per_case(&runs.join("score"));
    let mut qualifying = Vec::new();
    for r in rows.iter().filter(|r| r.class > 0) {
        let voxels = r.ref_mm3 / voxel_mm3;
        eprintln!(
            "overfit {} {:<30} {:>6.0} voxels  Dice {:.3}",
            r.case,
            BTCV_ORGANS[r.class - 1],
            voxels,
            r.dice
        );
        if voxels >= 1000.0 {
            qualifying.push(r.dice);
        }
    }
    // At 4.8 mm, spleen, liver, stomach and one or both kidneys of each case.
    assert!(qualifying.len() >= 8, "{} organs qualify", qualifying.len());
    let mean = qualifying.iter().sum::<f64>() / qualifying.len() as f64;
    eprintln!(
        "overfit: mean Dice {mean:.4} over {} (case, organ) pairs of ≥ 1000 voxels",
        qualifying.len()
    );
    assert!(mean > 0.85, "mean Dice {mean:.4} ≤ 0.85");

    // Weak labels scored without the model = the model scored directly.
    let (with_model, from_labels) = (
        metrics(&runs.join("score")),
        metrics(&runs.join("weak_quality")),
    );
    for (k, v) in with_model.iter().filter(|(k, _)| k.starts_with("dice_")) {
        let w = from_labels[k];
        assert!(
            (v - w).abs() < 1e-12 || (v.is_nan() && w.is_nan()),
            "{k}: model {v} vs weak labels {w}"
        );
    }

    // predict on each original CT (one of them non-RAS): the input's grid and
    // affine, and the labels on the organs of the original label map.
    let mut saw_non_ras = false;
    for case in ["case000", "case001"] {
        let input = runs.join("ct").join(case).join("image.nii.gz");
        let output = root.join(format!("{case}_seg.nii.gz"));
        predict(&root, &runs.join("fit"), &input, &output);
        let ct = nifti::read(&input).unwrap();
        saw_non_ras |= orientation::axcodes(&ct.affine).unwrap() != ['R', 'A', 'S'];
        let seg = nifti::read(&output).unwrap();
        assert_eq!(seg.shape, ct.shape);
        for r in 0..4 {
            for c in 0..4 {
                assert!((seg.affine[r][c] - ct.affine[r][c]).abs() < 1e-5);
            }
        }
        let truth = nifti::read(runs.join("ct").join(case).join("label.nii.gz")).unwrap();
        let dice = dice_per_class(&labels(&seg), &labels(&truth), 14);
        let big: Vec<f64> = rows
            .iter()
            .filter(|r| r.case == case && r.class > 0 && r.ref_mm3 / voxel_mm3 >= 1000.0)
            .map(|r| dice[r.class])
            .collect();
        let mean = big.iter().sum::<f64>() / big.len() as f64;
        eprintln!(
            "predict {case} on its original grid: mean Dice {mean:.4} over {} organs",
            big.len()
        );
        // Nearest resampling back to a 1.5× finer grid costs a few points.
        assert!(
            mean > 0.8,
            "{case}: predicted labels miss the organs (mean Dice {mean:.4})"
        );
    }
    assert!(saw_non_ras, "one of the phantoms must be stored non-RAS");
}

/// Iterations of the real-CT memorisation, validated every 25 (the best
/// model is kept, as in MONAI's tutorial). Measured with this configuration:
/// liver 0.88 after 100 iterations, kidneys from 175, the spleen, whose
/// contrast here (~33 HU) is that of the muscle around it, 0 until 250 and
/// 0.81 at 300 (other seeds and grids: from 175 to beyond 300), so 400.
const REAL_CT_ITERATIONS: usize = 400;

/// Real data: TotalSegmentator's example CT (abdomen + pelvis, 3 mm) with its
/// `--fast -fs` labels as the teacher, through the user's pipeline
/// (dataset → case-command → totalseg-labels → resample → train → evaluate),
/// memorised well enough that liver and spleen Dice exceed 0.8 (measured
/// 0.967 / 0.958, kidneys 0.97 / 0.96, stomach 0.95); then `tsdistill
/// predict` on the original 3 mm CT lands on TotalSegmentator's liver and
/// spleen there too (0.925 / 0.913, the 6 mm grid's steps costing the rest).
#[test]
fn r5_real_ct_liver_and_spleen_memorised_from_totalsegmentator_labels() {
    let data = crate::common::test_data().join("totalseg_example");
    let root = workspace("realct");
    let spacing = [6.0, 6.0, 6.0];
    let yaml = format!(
        r#"
name: realct
steps:
  ct: {{kind: dataset, images: "{d}/example_ct.nii.gz"}}
  teacher:
    kind: case-command
    input: ct
    keep: [image.nii.gz]
    run: cp {d}/example_seg_fast_force_split.nii.gz $TSD_OUT/totalseg.nii.gz
  labels: {{kind: totalseg-labels, input: teacher}}
  prep: {{kind: resample, input: labels, spacing: {spacing:?}}}
  fit:
    kind: train
    data: prep
    val: prep
    model: {{feature_size: 12, out_channels: 14}}
    roi: [64, 64, 32]
    samples_per_volume: 1
    iterations: {REAL_CT_ITERATIONS}
    val_every: 25
    lr: {OVERFIT_LR}
    aug: {{flip_prob: [0, 0, 0], rot90_prob: 0, shift_prob: 0}}
    seed: 0
    device: cpu
  score: {{kind: evaluate, data: prep, model: fit}}
"#,
        d = data.display()
    );
    std::fs::write(root.join("p.yaml"), yaml).unwrap();
    tsdistill(&root, &["run", "p.yaml", "--quiet"]);
    let runs = root.join("runs/realct");

    let rows = per_case(&runs.join("score"));
    for r in rows.iter().filter(|r| r.class > 0) {
        eprintln!(
            "real CT {:<30} Dice {:.3}",
            BTCV_ORGANS[r.class - 1],
            r.dice
        );
    }
    let dice = |class: usize| rows.iter().find(|r| r.class == class).unwrap().dice;
    let (spleen, liver) = (dice(1), dice(6));
    assert!(
        spleen > 0.8 && liver > 0.8,
        "at training resolution: spleen {spleen:.3}, liver {liver:.3}"
    );

    // On the original 3 mm grid, against the teacher's labels there.
    let input = data.join("example_ct.nii.gz");
    let output = root.join("example_ct_seg.nii.gz");
    predict(&root, &runs.join("fit"), &input, &output);
    let seg = nifti::read(&output).unwrap();
    let teacher = nifti::read(runs.join("labels/example_ct/label.nii.gz")).unwrap();
    assert_eq!(seg.shape, teacher.shape);
    let d = dice_per_class(&labels(&seg), &labels(&teacher), 14);
    eprintln!(
        "real CT predicted on its 3 mm grid: spleen {:.3}, liver {:.3}",
        d[1], d[6]
    );
    assert!(
        d[1] > 0.8 && d[6] > 0.8,
        "on the original grid: spleen {:.3}, liver {:.3}",
        d[1],
        d[6]
    );
}
