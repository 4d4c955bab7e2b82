//! Volume benchmarks (issue 4): resampling a 512×512×120 CT (0.78×0.78×2.5
//! mm) image + label to 1.5×1.5×2 mm, and `.nii.gz` read/write, against
//! SimpleITK, MONAI `Spacingd` and nibabel on the same files in the same run.
//!
//! `cargo bench --bench volume_bench` generates a phantom CT of that size,
//! writes it, times our side (best of 3), then runs the Python peer
//! (`benches/volume_peer.py`, interpreter from `TSDISTILL_BENCH_PYTHON`,
//! default `target/venv/bin/python` in this checkout; skipped with a note if absent)
//! and prints absolute times and ratios.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tsdistill::volume::nifti;
use tsdistill::volume::phantom::{generate_case, PhantomConfig};
use tsdistill::volume::resample::{resample_spacing, Interp};

const REPS: usize = 3;

fn best<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..REPS {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.unwrap())
}

fn main() {
    let dir = PathBuf::from(
        std::env::var("TSDISTILL_BENCH_DIR")
            .unwrap_or_else(|_| "/tmp/tsdistill-volume-bench".into()),
    );
    fs_err::create_dir_all(&dir).unwrap();
    let cfg = PhantomConfig {
        seed: 1,
        shape: [512, 512, 120],
        spacing: [0.78, 0.78, 2.5],
        noise_hu: 12.0,
        mixed_orientation: false,
        jitter_grid: false,
    };
    let t = Instant::now();
    let mut case = generate_case(&cfg, 0);
    assert_eq!(case.image.shape, [512, 512, 120]);
    eprintln!(
        "phantom {:?} generated in {:.2}s",
        case.image.shape,
        t.elapsed().as_secs_f64()
    );
    let (img_p, lab_p) = (dir.join("ct.nii.gz"), dir.join("label.nii.gz"));
    nifti::write(&lab_p, &case.label).unwrap();
    let lab = nifti::read(&lab_p).unwrap();
    // Our side is timed before and after the peer (best of both): the
    // machine is shared, so this keeps a load spike from deciding a ratio.
    let ours = |case: &mut tsdistill::volume::phantom::PhantomCase| {
        let (t_write, _) = best(|| nifti::write(&img_p, &case.image).unwrap());
        let (t_read, img) = best(|| nifti::read(&img_p).unwrap());
        case.image = img;
        let (t_img, out_img) =
            best(|| resample_spacing(&case.image, [1.5, 1.5, 2.0], Interp::Linear).unwrap());
        let (t_lab, out_lab) =
            best(|| resample_spacing(&lab, [1.5, 1.5, 2.0], Interp::Nearest).unwrap());
        assert_eq!(out_img.shape, out_lab.shape);
        ([t_write, t_read, t_img, t_lab], out_img.shape)
    };
    let (first, out_shape) = ours(&mut case);
    let threads = rayon::current_num_threads();
    println!(
        "input {:?} spacing {:?}, output {:?}; rayon threads {threads}",
        case.image.shape,
        case.image.spacing(),
        out_shape
    );
    let size = fs_err::metadata(&img_p).unwrap().len();

    let py = std::env::var("TSDISTILL_BENCH_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/venv/bin/python").into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/volume_peer.py");
    let peer = std::process::Command::new(&py)
        .arg(&script)
        .arg(&dir)
        .output();
    let peer: Option<serde_json::Value> = match peer {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).ok(),
        Ok(o) => {
            eprintln!("peer failed: {}", String::from_utf8_lossy(&o.stderr));
            None
        }
        Err(e) => {
            eprintln!("no Python peer ({py}: {e}); ours only");
            None
        }
    };
    let (second, _) = ours(&mut case);
    let [t_write, t_read, t_img, t_lab] = [0, 1, 2, 3].map(|i| first[i].min(second[i]));
    // Reading a file nibabel wrote (single gzip member: no parallel inflate).
    let nib_p = dir.join("ct_nibabel.nii.gz");
    let t_read_nib = if nib_p.exists() {
        Some(best(|| nifti::read(&nib_p).unwrap()).0)
    } else {
        None
    };
    // Where read time goes: inflate alone (bytes already in memory).
    let raw_ours = fs_err::read(&img_p).unwrap();
    let (t_inflate, plain) = best(|| tsdistill::volume::gzip::decompress(&raw_ours, None).unwrap());
    let (t_deflate, _) = best(|| tsdistill::volume::gzip::compress(&plain, 1));
    eprintln!(
        "in memory: inflate ours {t_inflate:.3}s, deflate level 1 {t_deflate:.3}s ({} MB raw)",
        plain.len() / 1_000_000
    );
    if nib_p.exists() {
        let raw = fs_err::read(&nib_p).unwrap();
        let (t, _) = best(|| tsdistill::volume::gzip::decompress(&raw, None).unwrap());
        eprintln!("in memory: inflate nibabel-written {t:.3}s");
    }

    println!(
        "\n{:<46} {:>10} {:>12} {:>8}",
        "task", "ours (s)", "peer (s)", "ratio"
    );
    let row = |task: &str, ours: f64, peer: Option<f64>, name: &str| match peer {
        Some(p) => println!(
            "{:<46} {:>10.3} {:>12.3} {:>7.2}×  ({name})",
            task,
            ours,
            p,
            p / ours
        ),
        None => println!("{:<46} {:>10.3} {:>12} {:>8}", task, ours, "-", "-"),
    };
    let g = |k: &str| peer.as_ref().and_then(|p| p[k].as_f64());
    let ours_rs = t_img + t_lab;
    row(
        "resample image+label → 1.5×1.5×2 (vs SimpleITK)",
        ours_rs,
        g("sitk_resample"),
        "SimpleITK",
    );
    row(
        "resample image+label → 1.5×1.5×2 (vs MONAI)",
        ours_rs,
        g("monai_spacingd"),
        "MONAI Spacingd",
    );
    row(
        "  image only, trilinear",
        t_img,
        g("sitk_image"),
        "SimpleITK",
    );
    row("  label only, nearest", t_lab, g("sitk_label"), "SimpleITK");
    row(
        &format!("read .nii.gz ours ({:.1} MB, int16)", size as f64 / 1e6),
        t_read,
        g("nib_read_ours"),
        "nibabel",
    );
    if let Some(t) = t_read_nib {
        row(
            "read .nii.gz written by nibabel (1 member)",
            t,
            g("nib_read_nib"),
            "nibabel",
        );
    }
    row(
        "write .nii.gz (level 1)",
        t_write,
        g("nib_write"),
        "nibabel",
    );
    if let Some(p) = &peer {
        println!("\npeer versions: {}", p["versions"]);
        if let Some(d) = p["monai_vs_ours_shape"].as_array() {
            println!("MONAI output shape {d:?}");
        }
    }
}
