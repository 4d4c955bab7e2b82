//! Random training patches: MONAI's `RandCropByPosNegLabeld` followed by the
//! seed recipe's augmentations (`RandFlipd` per axis, `RandRotate90d` in the
//! axial plane, `RandShiftIntensityd`).
//!
//! Volumes are C-order arrays `[n0, n1, n2]` in MONAI's axis order (NIfTI
//! i, j, k), so axes 0 and 1 span the axial plane that `RandRotate90d`'s
//! default `spatial_axes=(0, 1)` rotates.
//!
//! Centre rules (monai/transforms/utils.py):
//! - `map_binary_to_indices`: foreground = label > 0; background = label == 0
//!   and image > `image_threshold`.
//! - `generate_pos_neg_label_crop_centers`: per sample, foreground with
//!   probability pos/(pos+neg) (1 or 0 when one set is empty), then a uniform
//!   voxel of that set; `correct_crop_centers` then clamps the centre into
//!   `[size // 2, int(shape + 1 − size / 2) − 1]` so the patch fits.
//! - `SpatialCrop`: start = centre − size // 2.
//!
//! One deviation, documented: MONAI raises when a volume is smaller than the
//! patch; here such a volume is padded first (`SpatialPad`'s symmetric
//! constant padding, image 0, label 0), since small phantoms are common.
//!
//! Every random draw comes from the caller's RNG, in a fixed order, so the
//! same seed gives the same patches.

use rand::Rng;

use super::error::{param_err, Result, TrainError};

/// The patch sampler's and augmentations' parameters; `Default` is the seed
/// recipe (96³, pos 1, neg 1, 4 samples, threshold 0, flips 0.1, rot90 0.1
/// with max_k 3, intensity shift ±0.1 with p 0.5).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    /// Patch size per axis.
    pub spatial_size: [usize; 3],
    /// Relative weight of foreground-centred patches.
    pub pos: f64,
    /// Relative weight of background-centred patches.
    pub neg: f64,
    /// Patches drawn per volume (per iteration).
    pub num_samples: usize,
    /// Background centres need image > this value.
    pub image_threshold: f32,
    /// Probability of flipping along each axis.
    pub flip_prob: [f64; 3],
    /// Probability of an axial rot90.
    pub rot90_prob: f64,
    /// Rotations are by k·90° with k uniform in 1..=max_k.
    pub rot90_max_k: usize,
    /// Intensity shift is uniform in ±offset.
    pub shift_offset: f32,
    /// Probability of an intensity shift.
    pub shift_prob: f64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            spatial_size: [96, 96, 96],
            pos: 1.0,
            neg: 1.0,
            num_samples: 4,
            image_threshold: 0.0,
            flip_prob: [0.1; 3],
            rot90_prob: 0.1,
            rot90_max_k: 3,
            shift_offset: 0.1,
            shift_prob: 0.5,
        }
    }
}

impl SamplerConfig {
    /// Checks ranges, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if self.spatial_size.contains(&0) {
            return Err(param_err(
                "roi",
                format!("sizes must be ≥ 1, found {:?}", self.spatial_size),
            ));
        }
        if self.pos < 0.0 || self.neg < 0.0 || self.pos + self.neg <= 0.0 {
            return Err(param_err(
                "pos/neg",
                format!(
                    "must be ≥ 0 and not both 0, found {}/{}",
                    self.pos, self.neg
                ),
            ));
        }
        if self.num_samples == 0 {
            return Err(param_err(
                "samples_per_volume",
                "must be at least 1, found 0",
            ));
        }
        let probs = self
            .flip_prob
            .iter()
            .chain([&self.rot90_prob, &self.shift_prob]);
        if probs.clone().any(|p| !(0.0..=1.0).contains(p)) {
            return Err(param_err("aug", "probabilities must lie in [0, 1]"));
        }
        if self.rot90_prob > 0.0 && self.spatial_size[0] != self.spatial_size[1] {
            return Err(param_err(
                "roi",
                format!(
                    "rot90 in the axial plane needs roi[0] == roi[1] so patches stack, found {:?}",
                    self.spatial_size
                ),
            ));
        }
        if self.rot90_max_k == 0 {
            return Err(param_err("rot90_max_k", "must be at least 1, found 0"));
        }
        Ok(())
    }
}

/// One preprocessed volume ready for sampling, with its candidate centres.
#[derive(Debug, Clone)]
pub struct SamplingCase {
    /// Case id (for error messages).
    pub id: String,
    /// Intensities, C order.
    pub image: Vec<f32>,
    /// Class ids, C order.
    pub label: Vec<u8>,
    /// Shape after padding to at least the patch size.
    pub shape: [usize; 3],
    /// Flat indices with label > 0.
    pub fg: Vec<u32>,
    /// Flat indices with label == 0 and image > threshold.
    pub bg: Vec<u32>,
}

impl SamplingCase {
    /// Pads (if needed) and indexes a case.
    pub fn new(
        id: &str,
        image: Vec<f32>,
        label: Vec<u8>,
        shape: [usize; 3],
        cfg: &SamplerConfig,
    ) -> Result<Self> {
        let n: usize = shape.iter().product();
        if image.len() != n || label.len() != n {
            return Err(TrainError::Shape {
                what: format!("case `{id}`: image/label voxels"),
                expected: vec![n, n],
                found: vec![image.len(), label.len()],
            });
        }
        let (image, label, shape) = pad_to(image, label, shape, cfg.spatial_size);
        let mut fg = Vec::new();
        let mut bg = Vec::new();
        for (i, (&l, &v)) in label.iter().zip(&image).enumerate() {
            if l > 0 {
                fg.push(i as u32);
            } else if v > cfg.image_threshold {
                bg.push(i as u32);
            }
        }
        if fg.is_empty() && bg.is_empty() {
            return Err(TrainError::NoSamplingLocation {
                case: id.to_string(),
                threshold: cfg.image_threshold,
            });
        }
        Ok(SamplingCase {
            id: id.to_string(),
            image,
            label,
            shape,
            fg,
            bg,
        })
    }
}

/// One training patch.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    /// Intensities, C order, `shape`.
    pub image: Vec<f32>,
    /// Class ids, C order, `shape`.
    pub label: Vec<u8>,
    /// Patch shape (axes 0 and 1 swap under an odd rot90).
    pub shape: [usize; 3],
    /// The drawn voxel (flat index into the padded case) before the centre correction.
    pub drawn: usize,
    /// Whether it was drawn from the foreground set.
    pub from_foreground: bool,
    /// Start of the crop in the padded case.
    pub start: [usize; 3],
}

/// MONAI `correct_crop_centers` for one centre.
pub fn correct_crop_center(centre: [i64; 3], size: [usize; 3], shape: [usize; 3]) -> [usize; 3] {
    std::array::from_fn(|i| {
        let valid_start = (size[i] / 2) as i64;
        // np.subtract(shape + 1, size / 2).astype(uint16): truncation of a float.
        let mut valid_end = ((shape[i] + 1) as f64 - size[i] as f64 / 2.0) as i64;
        if valid_start == valid_end {
            valid_end += 1;
        }
        centre[i].max(valid_start).min(valid_end - 1) as usize
    })
}

/// Draws `cfg.num_samples` augmented patches from `case`.
pub fn sample_patches<R: Rng>(case: &SamplingCase, cfg: &SamplerConfig, rng: &mut R) -> Vec<Patch> {
    let pos_ratio = if case.fg.is_empty() {
        0.0
    } else if case.bg.is_empty() {
        1.0
    } else {
        cfg.pos / (cfg.pos + cfg.neg)
    };
    let [_, n1, n2] = case.shape;
    (0..cfg.num_samples)
        .map(|_| {
            let from_foreground = rng.random::<f64>() < pos_ratio;
            let set = if from_foreground { &case.fg } else { &case.bg };
            let drawn = set[rng.random_range(0..set.len())] as usize;
            let voxel = [drawn / (n1 * n2), (drawn / n2) % n1, drawn % n2];
            let centre = correct_crop_center(voxel.map(|v| v as i64), cfg.spatial_size, case.shape);
            let start: [usize; 3] = std::array::from_fn(|i| centre[i] - cfg.spatial_size[i] / 2);
            let (image, label) = crop(case, start, cfg.spatial_size);
            let mut patch = Patch {
                image,
                label,
                shape: cfg.spatial_size,
                drawn,
                from_foreground,
                start,
            };
            augment(&mut patch, cfg, rng);
            patch
        })
        .collect()
}

fn crop(case: &SamplingCase, start: [usize; 3], size: [usize; 3]) -> (Vec<f32>, Vec<u8>) {
    let [_, n1, n2] = case.shape;
    let len: usize = size.iter().product();
    let mut image = Vec::with_capacity(len);
    let mut label = Vec::with_capacity(len);
    for i in start[0]..start[0] + size[0] {
        for j in start[1]..start[1] + size[1] {
            let row = (i * n1 + j) * n2 + start[2];
            image.extend_from_slice(&case.image[row..row + size[2]]);
            label.extend_from_slice(&case.label[row..row + size[2]]);
        }
    }
    (image, label)
}

/// The recipe's augmentations, in MONAI's order: flip 0, flip 1, flip 2,
/// rot90, intensity shift (image only).
fn augment<R: Rng>(p: &mut Patch, cfg: &SamplerConfig, rng: &mut R) {
    for axis in 0..3 {
        if rng.random::<f64>() < cfg.flip_prob[axis] {
            p.image = flip(&p.image, p.shape, axis);
            p.label = flip(&p.label, p.shape, axis);
        }
    }
    if rng.random::<f64>() < cfg.rot90_prob {
        // RandRotate90: k = randint(max_k) + 1.
        let k = rng.random_range(0..cfg.rot90_max_k) + 1;
        let (img, shape) = rot90(&p.image, p.shape, k);
        p.label = rot90(&p.label, p.shape, k).0;
        p.image = img;
        p.shape = shape;
    }
    if rng.random::<f64>() < cfg.shift_prob {
        let offset = rng.random_range(-cfg.shift_offset..=cfg.shift_offset);
        p.image.iter_mut().for_each(|v| *v += offset);
    }
}

/// Reverses `axis` of a C-order array.
pub fn flip<T: Copy>(data: &[T], shape: [usize; 3], axis: usize) -> Vec<T> {
    let [n0, n1, n2] = shape;
    let mut out = Vec::with_capacity(data.len());
    for i in 0..n0 {
        for j in 0..n1 {
            for k in 0..n2 {
                let (mut a, mut b, mut c) = (i, j, k);
                match axis {
                    0 => a = n0 - 1 - i,
                    1 => b = n1 - 1 - j,
                    _ => c = n2 - 1 - k,
                }
                out.push(data[(a * n1 + b) * n2 + c]);
            }
        }
    }
    out
}

/// `np.rot90(x, k, axes=(0, 1))` of a C-order array; returns the new shape.
pub fn rot90<T: Copy>(data: &[T], shape: [usize; 3], k: usize) -> (Vec<T>, [usize; 3]) {
    let [n0, n1, n2] = shape;
    let k = k % 4;
    let out_shape = if k % 2 == 1 { [n1, n0, n2] } else { shape };
    let mut out = Vec::with_capacity(data.len());
    for a in 0..out_shape[0] {
        for b in 0..out_shape[1] {
            // Source (i, j) of output (a, b), from numpy's flip/transpose definition.
            let (i, j) = match k {
                0 => (a, b),
                1 => (b, n1 - 1 - a),
                2 => (n0 - 1 - a, n1 - 1 - b),
                _ => (n0 - 1 - b, a),
            };
            let row = (i * n1 + j) * n2;
            out.extend_from_slice(&data[row..row + n2]);
        }
    }
    (out, out_shape)
}

/// Symmetric constant padding (image 0, label 0) to at least `min` per axis.
fn pad_to(
    image: Vec<f32>,
    label: Vec<u8>,
    shape: [usize; 3],
    min: [usize; 3],
) -> (Vec<f32>, Vec<u8>, [usize; 3]) {
    if (0..3).all(|i| shape[i] >= min[i]) {
        return (image, label, shape);
    }
    let new: [usize; 3] = std::array::from_fn(|i| shape[i].max(min[i]));
    let before: [usize; 3] = std::array::from_fn(|i| (new[i] - shape[i]) / 2);
    let len: usize = new.iter().product();
    let mut img = vec![0f32; len];
    let mut lab = vec![0u8; len];
    for i in 0..shape[0] {
        for j in 0..shape[1] {
            let src = (i * shape[1] + j) * shape[2];
            let dst = ((i + before[0]) * new[1] + j + before[1]) * new[2] + before[2];
            img[dst..dst + shape[2]].copy_from_slice(&image[src..src + shape[2]]);
            lab[dst..dst + shape[2]].copy_from_slice(&label[src..src + shape[2]]);
        }
    }
    (img, lab, new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_by_hand() {
        let d: Vec<u8> = (0..8).collect();
        assert_eq!(flip(&d, [2, 2, 2], 0), vec![4, 5, 6, 7, 0, 1, 2, 3]);
        assert_eq!(flip(&d, [2, 2, 2], 2), vec![1, 0, 3, 2, 5, 4, 7, 6]);
    }

    #[test]
    fn small_volume_is_padded_symmetrically() {
        let cfg = SamplerConfig {
            spatial_size: [4, 2, 2],
            ..Default::default()
        };
        let case = SamplingCase::new("c", vec![1.0; 2], vec![1; 2], [1, 2, 1], &cfg).unwrap();
        assert_eq!(case.shape, [4, 2, 2]);
        // before = (4-1)/2 = 1 along axis 0, 0 along 1, (2-1)/2 = 0 along 2.
        let idx: Vec<u32> = vec![(2 * 2) as u32, (2 * 2 + 2) as u32];
        assert_eq!(case.fg, idx);
    }
}
