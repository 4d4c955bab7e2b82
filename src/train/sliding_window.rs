//! Sliding-window inference over a whole volume, exactly as MONAI's
//! `sliding_window_inference` (monai/inferers/utils.py) for 3-D inputs.
//!
//! What is reproduced, step by step:
//! 1. A volume smaller than the ROI along an axis is padded with `cval` by
//!    `diff // 2` before and the rest after (the `pad_size` loop); the output
//!    is cropped back at the end.
//! 2. The scan interval per axis is `int(roi·(1 − overlap))` (at least 1), or
//!    the ROI itself when ROI = size (`_get_scan_interval`).
//! 3. Window starts (`dense_patch_slices`): `d·interval` for d = 0 … the first
//!    d with `d·interval + roi ≥ size`; a start that would overrun is moved
//!    back to end at the border. Windows are enumerated in C order (axis 0
//!    slowest), batched `sw_batch_size` at a time.
//! 4. Blending (`compute_importance_map`): constant weights 1, or a separable
//!    Gaussian `exp(−x²/(2σ²))` over `x = −(roi−1)/2 … (roi−1)/2`,
//!    σ = sigma_scale·roi, clamped below at `max(min, 1e-3)`. Each window adds
//!    `weight·prediction`; the weight map is accumulated separately and the
//!    sum is divided by it.
//!
//! The predictor is any closure from a batch of patches [n, C_in, roi…] to
//! logits [n, C_out, roi…]; accumulation happens on the host in f32 (MONAI's
//! compute dtype for f32 inputs), so a large output never needs to fit on the
//! device.

use candle_core::{DType, Device, Tensor};

use super::error::{param_err, Result, TrainError};

/// How overlapping windows are blended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlendMode {
    /// Every voxel of a window weighs the same (MONAI `"constant"`).
    Constant,
    /// Voxels near the window centre weigh more (MONAI `"gaussian"`).
    Gaussian,
}

/// Parameters of [`sliding_window_inference`]; `Default` is MONAI's default
/// with the seed recipe's 96³ ROI and `sw_batch_size` 4.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlidingWindow {
    /// Window size per spatial axis.
    pub roi: [usize; 3],
    /// Windows per predictor call.
    pub sw_batch_size: usize,
    /// Fraction of overlap between neighbouring windows, in [0, 1).
    pub overlap: f64,
    /// Blending of overlapping windows.
    pub mode: BlendMode,
    /// σ of the Gaussian blend as a fraction of the ROI.
    pub sigma_scale: f64,
    /// Value used to pad a volume smaller than the ROI.
    pub cval: f32,
}

impl Default for SlidingWindow {
    fn default() -> Self {
        SlidingWindow {
            roi: [96, 96, 96],
            sw_batch_size: 4,
            overlap: 0.25,
            mode: BlendMode::Constant,
            sigma_scale: 0.125,
            cval: 0.0,
        }
    }
}

impl SlidingWindow {
    /// Checks the ranges MONAI checks, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.overlap) {
            return Err(param_err(
                "overlap",
                format!("must be in [0, 1), found {}", self.overlap),
            ));
        }
        if self.sw_batch_size == 0 {
            return Err(param_err("sw_batch_size", "must be at least 1, found 0"));
        }
        if self.roi.contains(&0) {
            return Err(param_err(
                "roi",
                format!("every size must be ≥ 1, found {:?}", self.roi),
            ));
        }
        if self.mode == BlendMode::Gaussian && self.sigma_scale <= 0.0 {
            return Err(param_err(
                "sigma_scale",
                format!("must be > 0, found {}", self.sigma_scale),
            ));
        }
        Ok(())
    }
}

/// Scan interval per axis (MONAI `_get_scan_interval`).
pub fn scan_interval(image: [usize; 3], roi: [usize; 3], overlap: f64) -> [usize; 3] {
    std::array::from_fn(|i| {
        if roi[i] == image[i] {
            roi[i]
        } else {
            // int() truncates towards zero, like Rust's `as`.
            ((roi[i] as f64 * (1.0 - overlap)) as usize).max(1)
        }
    })
}

/// Window start positions along one axis (MONAI `dense_patch_slices`);
/// `size ≥ roi` must hold (the input is padded first).
pub fn window_starts(size: usize, roi: usize, interval: usize) -> Vec<usize> {
    let roi = roi.min(size);
    let num = size.div_ceil(interval);
    let count = (0..num)
        .find(|d| d * interval + roi >= size)
        .map_or(1, |d| d + 1);
    (0..count)
        .map(|d| {
            let start = d * interval;
            start - (start + roi).saturating_sub(size)
        })
        .collect()
}

/// The blending weights of one window, C order (MONAI `compute_importance_map`).
pub fn importance_map(roi: [usize; 3], mode: BlendMode, sigma_scale: f64) -> Vec<f32> {
    let n: usize = roi.iter().product();
    let mut map = match mode {
        BlendMode::Constant => vec![1f32; n],
        BlendMode::Gaussian => {
            // MONAI builds the 1-D kernels in float32 and multiplies them.
            let g: Vec<Vec<f32>> = roi
                .iter()
                .map(|&r| {
                    // σ and -2σ² are Python floats in MONAI, cast to f32 by the op.
                    let sigma = r as f64 * sigma_scale;
                    let denom = (-2.0 * sigma * sigma) as f32;
                    (0..r)
                        .map(|i| {
                            let x = -((r as f32 - 1.0) / 2.0) + i as f32;
                            (x * x / denom).exp()
                        })
                        .collect()
                })
                .collect();
            let mut m = Vec::with_capacity(n);
            for a in &g[0] {
                for b in &g[1] {
                    for c in &g[2] {
                        m.push(a * b * c);
                    }
                }
            }
            m
        }
    };
    let min = map.iter().copied().fold(f32::INFINITY, f32::min).max(1e-3);
    map.iter_mut().for_each(|v| *v = v.max(min));
    map
}

/// Runs `predictor` over windows of `input` [B, C_in, D, H, W] and blends the
/// results into logits [B, C_out, D, H, W] (f32, on `input`'s device).
pub fn sliding_window_inference<F>(
    input: &Tensor,
    cfg: &SlidingWindow,
    mut predictor: F,
) -> Result<Tensor>
where
    F: FnMut(&Tensor) -> Result<Tensor>,
{
    cfg.validate()?;
    let dims = input.dims().to_vec();
    if dims.len() != 5 {
        return Err(TrainError::Shape {
            what: "input of sliding_window_inference ([B, C, D, H, W])".into(),
            expected: vec![0; 5],
            found: dims,
        });
    }
    let batch = dims[0];
    let orig = [dims[2], dims[3], dims[4]];
    let roi = cfg.roi;

    // 1. Pad axes smaller than the ROI: `half` before, the rest after.
    let mut x = input.to_dtype(DType::F32)?;
    let mut pad_before = [0usize; 3];
    for ax in 0..3 {
        let diff = roi[ax].saturating_sub(orig[ax]);
        if diff > 0 {
            let half = diff / 2;
            pad_before[ax] = half;
            x = pad_const(&x, 2 + ax, half, diff - half, cfg.cval)?;
        }
    }
    let image: [usize; 3] = std::array::from_fn(|i| orig[i].max(roi[i]));

    // 2./3. Window positions in C order.
    let interval = scan_interval(image, roi, cfg.overlap);
    let starts: Vec<Vec<usize>> = (0..3)
        .map(|a| window_starts(image[a], roi[a], interval[a]))
        .collect();
    let mut windows = Vec::new();
    for &s0 in &starts[0] {
        for &s1 in &starts[1] {
            for &s2 in &starts[2] {
                windows.push([s0, s1, s2]);
            }
        }
    }

    // 4. Weight map and its accumulation over all windows.
    let weights = importance_map(roi, cfg.mode, cfg.sigma_scale);
    let vol: usize = image.iter().product();
    let mut count = vec![0f32; vol];
    for w in &windows {
        add_window(&mut count, image, *w, roi, &weights, None);
    }

    let roi_len: usize = roi.iter().product();
    let mut out: Vec<Vec<f32>> = Vec::new();
    let mut out_channels = 0usize;
    let total = windows.len() * batch;
    let mut idx = 0;
    while idx < total {
        let end = (idx + cfg.sw_batch_size).min(total);
        let patches: Vec<Tensor> = (idx..end)
            .map(|g| {
                let (b, w) = (g / windows.len(), windows[g % windows.len()]);
                x.narrow(0, b, 1)?
                    .narrow(2, w[0], roi[0])?
                    .narrow(3, w[1], roi[1])?
                    .narrow(4, w[2], roi[2])
            })
            .collect::<candle_core::Result<_>>()?;
        let patch = Tensor::cat(&patches, 0)?;
        let pred = predictor(&patch)?;
        let pd = pred.dims().to_vec();
        if pd.len() != 5 || pd[0] != end - idx || pd[2..] != roi[..] {
            return Err(TrainError::Shape {
                what: "predictor output in sliding_window_inference ([n, C_out, roi…])".into(),
                expected: vec![
                    end - idx,
                    pd.get(1).copied().unwrap_or(0),
                    roi[0],
                    roi[1],
                    roi[2],
                ],
                found: pd,
            });
        }
        if out.is_empty() {
            out_channels = pd[1];
            out = vec![vec![0f32; out_channels * vol]; batch];
        }
        let host = pred.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for (n, g) in (idx..end).enumerate() {
            let (b, w) = (g / windows.len(), windows[g % windows.len()]);
            for c in 0..out_channels {
                let src = &host[(n * out_channels + c) * roi_len..][..roi_len];
                let dst = &mut out[b][c * vol..(c + 1) * vol];
                add_window(dst, image, w, roi, &weights, Some(src));
            }
        }
        idx = end;
    }

    // Divide by the accumulated weights and crop the padding away.
    let orig_len: usize = orig.iter().product();
    let mut result = Vec::with_capacity(batch * out_channels * orig_len);
    for per_batch in &out {
        for c in 0..out_channels {
            let ch = &per_batch[c * vol..(c + 1) * vol];
            for i in 0..orig[0] {
                for j in 0..orig[1] {
                    let row = ((i + pad_before[0]) * image[1] + j + pad_before[1]) * image[2];
                    for k in 0..orig[2] {
                        let v = row + k + pad_before[2];
                        result.push(ch[v] / count[v]);
                    }
                }
            }
        }
    }
    let shape = (batch, out_channels, orig[0], orig[1], orig[2]);
    Ok(Tensor::from_vec(result, shape, &Device::Cpu)?.to_device(input.device())?)
}

/// `dst[window] += weights · src` (or `+= weights` when `src` is `None`).
fn add_window(
    dst: &mut [f32],
    image: [usize; 3],
    start: [usize; 3],
    roi: [usize; 3],
    weights: &[f32],
    src: Option<&[f32]>,
) {
    for i in 0..roi[0] {
        for j in 0..roi[1] {
            let d_row = ((start[0] + i) * image[1] + start[1] + j) * image[2] + start[2];
            let s_row = (i * roi[1] + j) * roi[2];
            let d = &mut dst[d_row..d_row + roi[2]];
            let w = &weights[s_row..s_row + roi[2]];
            match src {
                Some(src) => {
                    let s = &src[s_row..s_row + roi[2]];
                    for k in 0..roi[2] {
                        d[k] += s[k] * w[k];
                    }
                }
                None => d.iter_mut().zip(w).for_each(|(d, w)| *d += w),
            }
        }
    }
}

/// Pads `dim` of `x` with `before`/`after` entries of value `cval`.
fn pad_const(x: &Tensor, dim: usize, before: usize, after: usize, cval: f32) -> Result<Tensor> {
    let mut parts = Vec::new();
    let mut shape = x.dims().to_vec();
    if before > 0 {
        shape[dim] = before;
        parts.push(Tensor::full(cval, shape.as_slice(), x.device())?);
    }
    parts.push(x.clone());
    if after > 0 {
        shape[dim] = after;
        parts.push(Tensor::full(cval, shape.as_slice(), x.device())?);
    }
    Ok(Tensor::cat(&parts, dim)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed from MONAI's rules: size 20, roi 8, overlap 0.25 →
    /// interval 6; starts 0, 6, 12 (12 + 8 = 20 reaches the end).
    #[test]
    fn starts_by_hand() {
        assert_eq!(scan_interval([20, 8, 13], [8, 8, 8], 0.25), [6, 8, 6]);
        assert_eq!(window_starts(20, 8, 6), vec![0, 6, 12]);
        // 13 with interval 6: 0, 6 → 6 + 8 = 14 > 13, shifted back to 5.
        assert_eq!(window_starts(13, 8, 6), vec![0, 5]);
        assert_eq!(window_starts(8, 8, 8), vec![0]);
    }

    #[test]
    fn bad_overlap_names_the_parameter() {
        let cfg = SlidingWindow {
            overlap: 1.0,
            ..Default::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`overlap`"));
    }
}
