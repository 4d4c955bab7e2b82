//! Segmentation metrics with MONAI's exact semantics: Dice (`DiceMetric`),
//! the percentile Hausdorff distance in mm (`compute_hausdorff_distance`),
//! and organ volumes in mm³.
//!
//! Label maps are flat `u8` slices in C order over a [`Grid`]
//! (index = (i·n1 + j)·n2 + k), the layout of a `[n0, n1, n2]` tensor.
//!
//! MONAI semantics reproduced here (monai 1.6.1):
//! - Dice per (case, class), `DiceHelper.compute_channel`: `2|y∩ŷ| / (|y| + |ŷ|)`
//!   without smoothing; with `ignore_empty=True` (the default) a class absent
//!   from the reference is NaN, whatever the prediction.
//! - `reduction="mean"` (metrics/utils.py `do_metric_reduction`): average the
//!   non-NaN classes of each case, then the cases that have at least one;
//!   `"mean_batch"`: per class, average over the cases where it is not NaN,
//!   and 0.0 (MONAI's `t_zero`) when it is NaN in every case.
//! - Hausdorff (metrics/hausdorff_distance.py, metrics/utils.py): surfaces are
//!   `mask XOR binary_erosion(mask)` with the 6-neighbour cross and
//!   out-of-volume counted as background (scipy's defaults; MONAI's crop with
//!   margin 1 changes nothing); distances are Euclidean in mm from each
//!   surface voxel of one mask to the nearest surface voxel of the other, in
//!   both directions; each direction is reduced by `torch.quantile` (linear
//!   interpolation) and the larger is the result. Empty masks follow
//!   `get_surface_distance`: a direction towards an empty surface is a list of
//!   +inf, so HD95 is NaN (inf − inf in the interpolation) and the plain
//!   maximum is +inf when exactly one mask is empty; both empty gives NaN.

/// The voxel grid of a label map.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    /// Number of voxels per axis, C order (the last axis varies fastest).
    pub shape: [usize; 3],
    /// Voxel size per axis in mm.
    pub spacing: [f64; 3],
}

impl Grid {
    /// Total number of voxels.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether the grid has no voxel.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Volume of one voxel in mm³.
    pub fn voxel_volume(&self) -> f64 {
        self.spacing.iter().product()
    }
}

/// Per-class voxel counts of a prediction against a reference, in one pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Overlap {
    /// Voxels predicted as each class.
    pub pred: Vec<u64>,
    /// Voxels of each class in the reference.
    pub reference: Vec<u64>,
    /// Voxels where both say the class.
    pub both: Vec<u64>,
}

impl Overlap {
    /// Counts classes `0..num_classes`; ids ≥ num_classes are ignored (as a
    /// one-hot with `num_classes` channels would drop them).
    pub fn count(pred: &[u8], reference: &[u8], num_classes: usize) -> Overlap {
        assert_eq!(
            pred.len(),
            reference.len(),
            "prediction and reference sizes differ"
        );
        let mut o = Overlap {
            pred: vec![0; num_classes],
            reference: vec![0; num_classes],
            both: vec![0; num_classes],
        };
        for (&p, &r) in pred.iter().zip(reference) {
            let (p, r) = (p as usize, r as usize);
            if p < num_classes {
                o.pred[p] += 1;
            }
            if r < num_classes {
                o.reference[r] += 1;
                if p == r {
                    o.both[r] += 1;
                }
            }
        }
        o
    }

    /// MONAI `DiceMetric` per class (`ignore_empty=True`): NaN where the
    /// reference lacks the class.
    pub fn dice(&self) -> Vec<f64> {
        (0..self.pred.len())
            .map(|c| {
                let y = self.reference[c];
                if y == 0 {
                    f64::NAN
                } else {
                    2.0 * self.both[c] as f64 / (y + self.pred[c]) as f64
                }
            })
            .collect()
    }
}

/// Per-class Dice of one case (MONAI `DiceMetric`, `ignore_empty=True`),
/// background (class 0) included; drop element 0 for `include_background=False`.
pub fn dice_per_class(pred: &[u8], reference: &[u8], num_classes: usize) -> Vec<f64> {
    Overlap::count(pred, reference, num_classes).dice()
}

fn classes(row: &[f64], include_background: bool) -> &[f64] {
    if include_background || row.is_empty() {
        row
    } else {
        &row[1..]
    }
}

/// MONAI `reduction="mean"` over per-case rows of per-class Dice (each row
/// includes the background at index 0): NaN entries are skipped, cases with
/// no valid class are left out. NaN when nothing is valid at all.
pub fn mean_dice(per_case: &[Vec<f64>], include_background: bool) -> f64 {
    let case_means: Vec<f64> = per_case
        .iter()
        .filter_map(|row| nan_mean(classes(row, include_background)))
        .collect();
    nan_mean(&case_means).unwrap_or(f64::NAN)
}

/// MONAI `reduction="mean_batch"`: the mean of each class over the cases
/// where it is not NaN; 0.0 when it is NaN in every case (MONAI's choice).
pub fn mean_dice_per_class(per_case: &[Vec<f64>], include_background: bool) -> Vec<f64> {
    let Some(first) = per_case.first() else {
        return Vec::new();
    };
    let n = classes(first, include_background).len();
    (0..n)
        .map(|c| {
            let col: Vec<f64> = per_case
                .iter()
                .map(|row| classes(row, include_background)[c])
                .collect();
            nan_mean(&col).unwrap_or(0.0)
        })
        .collect()
}

/// Mean of the non-NaN values, `None` when there are none.
pub fn nan_mean(values: &[f64]) -> Option<f64> {
    let (sum, n) = values
        .iter()
        .filter(|v| !v.is_nan())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Volume of each class `0..num_classes` in mm³.
pub fn volumes_mm3(labels: &[u8], grid: &Grid, num_classes: usize) -> Vec<f64> {
    let mut counts = vec![0u64; num_classes];
    for &l in labels {
        if (l as usize) < num_classes {
            counts[l as usize] += 1;
        }
    }
    counts
        .iter()
        .map(|&n| n as f64 * grid.voxel_volume())
        .collect()
}

/// Surface voxels of `mask`: voxels of the mask with at least one of their 6
/// face neighbours outside it (or outside the volume), i.e.
/// `mask XOR binary_erosion(mask)` with scipy's default structure.
pub fn surface(mask: &[bool], shape: [usize; 3]) -> Vec<bool> {
    let [n0, n1, n2] = shape;
    let at = |i: usize, j: usize, k: usize| mask[(i * n1 + j) * n2 + k];
    let mut out = vec![false; mask.len()];
    for i in 0..n0 {
        for j in 0..n1 {
            for k in 0..n2 {
                let idx = (i * n1 + j) * n2 + k;
                if !mask[idx] {
                    continue;
                }
                let interior = i > 0
                    && i + 1 < n0
                    && j > 0
                    && j + 1 < n1
                    && k > 0
                    && k + 1 < n2
                    && at(i - 1, j, k)
                    && at(i + 1, j, k)
                    && at(i, j - 1, k)
                    && at(i, j + 1, k)
                    && at(i, j, k - 1)
                    && at(i, j, k + 1);
                out[idx] = !interior;
            }
        }
    }
    out
}

/// Squared Euclidean distance (mm²) from every voxel to the nearest `true`
/// voxel of `seeds` (+inf when there is none): the exact separable transform
/// of Felzenszwalb & Huttenlocher (2012), one lower envelope of parabolas per
/// line and axis, with anisotropic spacing.
pub fn squared_distance_transform(seeds: &[bool], grid: &Grid) -> Vec<f64> {
    let [n0, n1, n2] = grid.shape;
    let mut d: Vec<f64> = seeds
        .iter()
        .map(|&s| if s { 0.0 } else { f64::INFINITY })
        .collect();
    let max_n = n0.max(n1).max(n2);
    let mut line = vec![0.0; max_n];
    let mut out = vec![0.0; max_n];
    let mut v = vec![0usize; max_n];
    let mut z = vec![0.0; max_n + 1];
    let strides = [n1 * n2, n2, 1];
    for axis in 0..3 {
        let n = grid.shape[axis];
        let stride = strides[axis];
        let s = grid.spacing[axis];
        // Every line along `axis`: iterate over the other two coordinates.
        for base in 0..d.len() {
            if (base / stride) % n != 0 {
                continue;
            }
            for q in 0..n {
                line[q] = d[base + q * stride];
            }
            envelope_1d(&line[..n], s, &mut out[..n], &mut v, &mut z);
            for q in 0..n {
                d[base + q * stride] = out[q];
            }
        }
    }
    d
}

/// 1-D squared distance transform of `f` (values 0/finite or +inf) on
/// positions `q·s`.
fn envelope_1d(f: &[f64], s: f64, out: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    let pos = |q: usize| q as f64 * s;
    let mut k: isize = -1;
    for q in 0..n {
        if f[q].is_infinite() {
            continue;
        }
        let mut cross = f64::NEG_INFINITY;
        while k >= 0 {
            let p = v[k as usize];
            cross =
                ((f[q] + pos(q) * pos(q)) - (f[p] + pos(p) * pos(p))) / (2.0 * (pos(q) - pos(p)));
            if cross <= z[k as usize] {
                k -= 1;
                cross = f64::NEG_INFINITY;
            } else {
                break;
            }
        }
        k += 1;
        v[k as usize] = q;
        z[k as usize] = if k == 0 { f64::NEG_INFINITY } else { cross };
        z[k as usize + 1] = f64::INFINITY;
    }
    if k < 0 {
        out.iter_mut().for_each(|o| *o = f64::INFINITY);
        return;
    }
    let mut j = 0usize;
    for q in 0..n {
        while z[j + 1] < pos(q) {
            j += 1;
        }
        let dq = pos(q) - pos(v[j]);
        out[q] = dq * dq + f[v[j]];
    }
}

/// Distances (mm) from each `from` surface voxel to the nearest `to` surface
/// voxel, with MONAI's `get_surface_distance` rules for empty surfaces.
fn directed_distances(from: &[bool], to: &[bool], grid: &Grid) -> Vec<f64> {
    let n_from = from.iter().filter(|&&b| b).count();
    let n_to = to.iter().filter(|&&b| b).count();
    if n_to == 0 {
        return vec![f64::INFINITY; n_from];
    }
    if n_from == 0 {
        // MONAI returns +inf for every voxel of the *target* surface here.
        return vec![f64::INFINITY; n_to];
    }
    let d2 = squared_distance_transform(to, grid);
    from.iter()
        .zip(&d2)
        .filter(|(&f, _)| f)
        .map(|(_, &d)| d.sqrt())
        .collect()
}

/// `torch.quantile(values, q)` with linear interpolation; NaN for an empty list.
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = q * (values.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let w = rank - lo as f64;
    let (a, b) = (values[lo], values[hi]);
    // torch.lerp's two-sided formula; with a = b = inf both give NaN, as in MONAI.
    if w < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// MONAI `compute_hausdorff_distance` for one class of one case: the
/// symmetric Hausdorff distance in mm between the surfaces of `pred == class`
/// and `reference == class`; `percentile` 95 gives HD95, `None` the maximum.
pub fn hausdorff_distance(
    pred: &[u8],
    reference: &[u8],
    grid: &Grid,
    class: u8,
    percentile: Option<f64>,
) -> f64 {
    let pm: Vec<bool> = pred.iter().map(|&v| v == class).collect();
    let rm: Vec<bool> = reference.iter().map(|&v| v == class).collect();
    let (pm, rm, sub) = crop_to_union(&pm, &rm, grid);
    let ps = surface(&pm, sub.shape);
    let rs = surface(&rm, sub.shape);
    let reduce = |mut d: Vec<f64>| match percentile {
        Some(p) => quantile(&mut d, p / 100.0),
        None if d.is_empty() => f64::NAN,
        None => d.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    };
    let a = reduce(directed_distances(&ps, &rs, &sub));
    let b = reduce(directed_distances(&rs, &ps, &sub));
    // torch.max over the two propagates NaN.
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Crops two masks to the bounding box of their union plus a margin of one
/// voxel (clamped to the volume): surfaces and distances are unchanged, work
/// shrinks to the organ.
fn crop_to_union(a: &[bool], b: &[bool], grid: &Grid) -> (Vec<bool>, Vec<bool>, Grid) {
    let [n0, n1, n2] = grid.shape;
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    for i in 0..n0 {
        for j in 0..n1 {
            for k in 0..n2 {
                let idx = (i * n1 + j) * n2 + k;
                if a[idx] || b[idx] {
                    for (ax, c) in [i, j, k].into_iter().enumerate() {
                        lo[ax] = lo[ax].min(c);
                        hi[ax] = hi[ax].max(c);
                    }
                }
            }
        }
    }
    if lo[0] == usize::MAX {
        let sub = Grid {
            shape: [0, 0, 0],
            spacing: grid.spacing,
        };
        return (Vec::new(), Vec::new(), sub);
    }
    for ax in 0..3 {
        lo[ax] = lo[ax].saturating_sub(1);
        hi[ax] = (hi[ax] + 1).min(grid.shape[ax] - 1);
    }
    let shape = [hi[0] - lo[0] + 1, hi[1] - lo[1] + 1, hi[2] - lo[2] + 1];
    let mut ca = Vec::with_capacity(shape.iter().product());
    let mut cb = Vec::with_capacity(ca.capacity());
    for i in lo[0]..=hi[0] {
        for j in lo[1]..=hi[1] {
            let row = (i * n1 + j) * n2;
            ca.extend_from_slice(&a[row + lo[2]..=row + hi[2]]);
            cb.extend_from_slice(&b[row + lo[2]..=row + hi[2]]);
        }
    }
    (
        ca,
        cb,
        Grid {
            shape,
            spacing: grid.spacing,
        },
    )
}

/// Every metric of one case: per class Dice, HD95 (mm) and volumes (mm³).
#[derive(Debug, Clone, PartialEq)]
pub struct CaseMetrics {
    /// Dice per class 0..num_classes (NaN: class absent from the reference).
    pub dice: Vec<f64>,
    /// HD95 in mm per class (NaN when either mask is empty, as in MONAI).
    pub hd95: Vec<f64>,
    /// Predicted volume per class in mm³.
    pub pred_volume_mm3: Vec<f64>,
    /// Reference volume per class in mm³.
    pub ref_volume_mm3: Vec<f64>,
}

/// Computes [`CaseMetrics`]; HD95 is computed for the foreground classes only
/// (the background's surface is the volume border: meaningless and costly),
/// leaving NaN at index 0.
pub fn case_metrics(pred: &[u8], reference: &[u8], grid: &Grid, num_classes: usize) -> CaseMetrics {
    use rayon::prelude::*;
    let overlap = Overlap::count(pred, reference, num_classes);
    // Classes are independent: one task each (the collected order is the class order).
    let hd95 = (0..num_classes)
        .into_par_iter()
        .map(|c| {
            if c == 0 || (overlap.pred[c] == 0 && overlap.reference[c] == 0) {
                f64::NAN
            } else {
                hausdorff_distance(pred, reference, grid, c as u8, Some(95.0))
            }
        })
        .collect();
    let voxel = grid.voxel_volume();
    CaseMetrics {
        dice: overlap.dice(),
        hd95,
        pred_volume_mm3: overlap.pred.iter().map(|&n| n as f64 * voxel).collect(),
        ref_volume_mm3: overlap
            .reference
            .iter()
            .map(|&n| n as f64 * voxel)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force: the transform equals the minimum over all seeds.
    #[test]
    fn distance_transform_matches_brute_force() {
        let grid = Grid {
            shape: [7, 5, 6],
            spacing: [1.5, 0.7, 2.0],
        };
        let seeds: Vec<bool> = (0..grid.len()).map(|i| (i * 37 + 11) % 23 == 0).collect();
        let d = squared_distance_transform(&seeds, &grid);
        let coord = |i: usize| [i / 30, (i / 6) % 5, i % 6];
        for v in 0..grid.len() {
            let cv = coord(v);
            let want = (0..grid.len())
                .filter(|&s| seeds[s])
                .map(|s| {
                    let cs = coord(s);
                    (0..3)
                        .map(|a| ((cv[a] as f64 - cs[a] as f64) * grid.spacing[a]).powi(2))
                        .sum()
                })
                .fold(f64::INFINITY, f64::min);
            assert!((d[v] - want).abs() < 1e-9, "voxel {v}: {} vs {want}", d[v]);
        }
    }

    #[test]
    fn quantile_like_torch() {
        // torch.quantile(tensor([1., 2., 4., 8.]), 0.95) = 4 + 0.85·4 = 7.4
        assert!((quantile(&mut [8.0, 1.0, 4.0, 2.0], 0.95) - 7.4).abs() < 1e-12);
        assert!(quantile(&mut [f64::INFINITY, f64::INFINITY], 0.95).is_nan());
        assert!(quantile(&mut [], 0.95).is_nan());
    }

    #[test]
    fn surface_of_a_cube_is_its_shell() {
        let shape = [5, 5, 5];
        let mask = vec![true; 125];
        let s = surface(&mask, shape);
        assert_eq!(s.iter().filter(|&&b| b).count(), 125 - 27);
    }
}
