//! Resampling to a voxel spacing, with MONAI `Spacingd`'s geometry, and the
//! inverse mapping back onto a case's original grid.
//!
//! Output grid (MONAI 1.x `Spacing.__call__` → `zoom_affine(diagonal=False)`
//! → `compute_shape_offset(scale_extent=False)`, monai/data/utils.py):
//! - the direction (rotation) of the input affine is kept and its column
//!   norms are replaced by the target spacing (`zoom_affine` via Cholesky);
//! - the input's corner voxel *centres* (index 0 and n−1 on each axis) are
//!   mapped into the new voxel frame; the shape is `round(extent + 1)` with
//!   numpy's round-half-to-even;
//! - the origin is the world position of the input corner that is smallest
//!   in every new axis (for an axis-aligned input: voxel (0,0,0)), so the
//!   first voxel centres coincide; if no corner is, the centres of the two
//!   grids are aligned instead.
//!
//! Sampling: output voxel `o` reads input index `inv(A_in) · A_out · o`
//! (voxel centres, MONAI's `align_corners=False` convention), with
//! `padding_mode="border"` (MONAI's default): coordinates clamp to the
//! input's edge. Images use trilinear interpolation (f32 output); labels use
//! nearest neighbour rounding halves up (`floor(x + 0.5)`, ITK's rule; torch
//! rounds half to even, which at exact ties such as 3 mm → 1.5 mm gives every
//! other voxel three samples and its neighbour one, so organ volumes drift).
//! Axis-aligned transforms (the usual case after reorientation) use per-axis
//! index/weight tables; others fall back to a full 3×3 mapping per voxel.

use rayon::prelude::*;

use super::volume::{apply, inv3, inverse, linear, matmul, Affine, Scalar, Volume, Voxels};

/// How to sample between voxels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interp {
    /// Trilinear (MONAI `bilinear`); output is f32.
    Linear,
    /// Nearest neighbour; output keeps the input dtype.
    Nearest,
}

/// A target grid: shape and voxel → world affine.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// Voxels per axis.
    pub shape: [usize; 3],
    /// Voxel → world (mm).
    pub affine: Affine,
}

impl Grid {
    /// The grid of an existing volume.
    pub fn of(vol: &Volume) -> Grid {
        Grid {
            shape: vol.shape,
            affine: vol.affine,
        }
    }
}

/// Resampling errors.
#[derive(Debug, thiserror::Error)]
pub enum ResampleError {
    /// A non-positive or non-finite spacing.
    #[error("invalid target spacing {0:?}: expected three positive numbers (mm)")]
    BadSpacing([f64; 3]),
    /// An affine whose 3×3 part is singular.
    #[error("affine is singular: {0:?}")]
    Singular(Affine),
}

/// numpy's `np.round`: halves go to the even neighbour.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Upper-triangular Z with `ZᵀZ = M` (M symmetric positive definite).
fn cholesky_upper(m: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    // Lower L with L Lᵀ = M, then Z = Lᵀ (numpy `cholesky(...).T`).
    let mut l = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                l[i][j] = (m[i][i] - s).max(0.0).sqrt();
            } else {
                l[i][j] = (m[i][j] - s) / l[j][j];
            }
        }
    }
    let mut z = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            z[i][j] = l[j][i];
        }
    }
    z
}

/// MONAI `zoom_affine(affine, pixdim, diagonal=False)`: keep the rotation,
/// set the spacing; no translation.
fn zoom_affine(a: &Affine, pixdim: [f64; 3]) -> Result<Affine, ResampleError> {
    let rzs = linear(a);
    let mut rtr = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            rtr[i][j] = (0..3).map(|k| rzs[k][i] * rzs[k][j]).sum();
        }
    }
    let zs = cholesky_upper(&rtr);
    let zinv = inv3(&zs).ok_or(ResampleError::Singular(*a))?;
    let mut out = super::volume::identity();
    for i in 0..3 {
        for j in 0..3 {
            let rot: f64 = (0..3).map(|k| rzs[i][k] * zinv[k][j]).sum();
            out[i][j] = rot * zs[j][j].signum() * pixdim[j].abs();
        }
    }
    Ok(out)
}

/// The output grid of MONAI `Spacing(pixdim)` for an input grid.
pub fn spacing_grid(input: &Grid, pixdim: [f64; 3]) -> Result<Grid, ResampleError> {
    if pixdim.iter().any(|&p| !(p.is_finite() && p > 0.0)) {
        return Err(ResampleError::BadSpacing(pixdim));
    }
    let mut out = zoom_affine(&input.affine, pixdim)?;
    let out_inv = inverse(&out).ok_or(ResampleError::Singular(out))?;
    let to_out = matmul(&out_inv, &input.affine);
    let n = input.shape.map(|s| s as f64);
    let mut corners = Vec::with_capacity(8);
    for &x in &[0.0, n[0] - 1.0] {
        for &y in &[0.0, n[1] - 1.0] {
            for &z in &[0.0, n[2] - 1.0] {
                corners.push([x, y, z]);
            }
        }
    }
    let mapped: Vec<[f64; 3]> = corners.iter().map(|&c| apply(&to_out, c)).collect();
    let mut shape = [0usize; 3];
    for ax in 0..3 {
        let lo = mapped.iter().map(|c| c[ax]).fold(f64::INFINITY, f64::min);
        let hi = mapped
            .iter()
            .map(|c| c[ax])
            .fold(f64::NEG_INFINITY, f64::max);
        shape[ax] = round_half_even(hi - lo + 1.0).max(1.0) as usize;
    }
    // The corner that is smallest along every new axis, within numpy
    // `allclose`'s default atol of 1e-8.
    let min_corner = (0..mapped.len()).find(|&i| {
        (0..3).all(|ax| {
            mapped
                .iter()
                .map(|c| c[ax] - mapped[i][ax])
                .fold(f64::INFINITY, f64::min)
                .abs()
                <= 1e-8
        })
    });
    let offset = match min_corner {
        Some(i) => apply(&input.affine, corners[i]),
        None => {
            // Centre alignment: A_in[:3,:3]·(n/2) + t_in − A_out[:3,:3]·(shape/2).
            let a = apply(&input.affine, [n[0] / 2.0, n[1] / 2.0, n[2] / 2.0]);
            let half = shape.map(|s| s as f64 / 2.0);
            let b = apply(&out, half);
            [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
        }
    };
    for i in 0..3 {
        out[i][3] = offset[i];
    }
    Ok(Grid { shape, affine: out })
}

/// Resamples `vol` to `pixdim` (mm) like MONAI `Spacing`.
pub fn resample_spacing(
    vol: &Volume,
    pixdim: [f64; 3],
    interp: Interp,
) -> Result<Volume, ResampleError> {
    let grid = spacing_grid(&Grid::of(vol), pixdim)?;
    resample_to_grid(vol, &grid, interp)
}

/// Samples `vol` at the voxel centres of `grid` (border padding).
pub fn resample_to_grid(
    vol: &Volume,
    grid: &Grid,
    interp: Interp,
) -> Result<Volume, ResampleError> {
    let inv = inverse(&vol.affine).ok_or(ResampleError::Singular(vol.affine))?;
    let m = matmul(&inv, &grid.affine); // output index → input index
    let data = match interp {
        Interp::Linear => Voxels::F32(
            crate::with_voxels!(&vol.data, v => linear_sample(v, vol.shape, &m, grid.shape)),
        ),
        Interp::Nearest => {
            crate::map_voxels!(&vol.data, v => nearest_sample(v, vol.shape, &m, grid.shape))
        }
    };
    Ok(Volume::new(grid.shape, grid.affine, data))
}

/// Maps a (resampled) label map back onto an original grid, nearest
/// neighbour: the inverse of [`resample_spacing`] for predictions made on
/// the resampled grid (TotalSegmentator does the same to bring its outputs
/// back to the input grid). Original voxels whose centre lies more than half
/// a voxel outside the label map (e.g. the air cut away by a foreground crop)
/// get 0, background; ITK's `IsInsideBuffer` uses the same half-voxel rule.
pub fn to_original_grid(label: &Volume, original: &Grid) -> Result<Volume, ResampleError> {
    let inv = inverse(&label.affine).ok_or(ResampleError::Singular(label.affine))?;
    let m = matmul(&inv, &original.affine);
    let data = crate::map_voxels!(&label.data, v => {
        let mut d = nearest_sample(v, label.shape, &m, original.shape);
        zero_outside(&mut d, label.shape, &m, original.shape);
        d
    });
    Ok(Volume::new(original.shape, original.affine, data))
}

/// Sets voxels whose source point is beyond the half-voxel border to 0.
fn zero_outside<T: Scalar>(d: &mut [T], shape: [usize; 3], m: &Affine, out: [usize; 3]) {
    let [ox, oy, _] = out;
    let inside = |q: f64, n: usize| q >= -0.5 - 1e-6 && q <= n as f64 - 0.5 + 1e-6;
    d.par_chunks_mut(ox * oy).enumerate().for_each(|(z, slab)| {
        for (y, row) in slab.chunks_mut(ox).enumerate() {
            for (x, v) in row.iter_mut().enumerate() {
                let p = apply(m, [x as f64, y as f64, z as f64]);
                if !(inside(p[0], shape[0]) && inside(p[1], shape[1]) && inside(p[2], shape[2])) {
                    *v = T::default();
                }
            }
        }
    });
}

/// True when `m`'s 3×3 part is diagonal (each output axis reads one input axis).
fn is_axis_aligned(m: &Affine) -> bool {
    let scale = (0..3)
        .map(|i| m[i][i].abs())
        .fold(0.0, f64::max)
        .max(1e-300);
    (0..3).all(|i| (0..3).all(|j| i == j || m[i][j].abs() <= 1e-9 * scale))
}

/// Per-axis linear taps: for each output index, (i0, i1, w1) with clamping.
fn taps(n_in: usize, n_out: usize, scale: f64, offset: f64) -> Vec<(usize, usize, f32)> {
    (0..n_out)
        .map(|o| {
            let c = (scale * o as f64 + offset).clamp(0.0, (n_in - 1) as f64);
            let i0 = c.floor() as usize;
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, (c - i0 as f64) as f32)
        })
        .collect()
}

/// Per-axis nearest index with clamping, halves rounded up.
fn nearest_taps(n_in: usize, n_out: usize, scale: f64, offset: f64) -> Vec<usize> {
    (0..n_out)
        .map(|o| {
            let c = (scale * o as f64 + offset).clamp(0.0, (n_in - 1) as f64);
            // A hair of tolerance so ties computed as 0.4999999 still go up.
            ((c + 0.5 + 1e-9).floor() as usize).min(n_in - 1)
        })
        .collect()
}

fn linear_sample<T: Scalar>(v: &[T], shape: [usize; 3], m: &Affine, out: [usize; 3]) -> Vec<f32> {
    let [nx, ny, nz] = shape;
    let [ox, oy, _] = out;
    let mut dst = vec![0f32; out.iter().product()];
    let at = |x: usize, y: usize, z: usize| v[x + nx * (y + ny * z)].to_f64() as f32;
    if is_axis_aligned(m) {
        let tx = taps(nx, ox, m[0][0], m[0][3]);
        let ty = taps(ny, oy, m[1][1], m[1][3]);
        let tz = taps(nz, out[2], m[2][2], m[2][3]);
        dst.par_chunks_mut(ox * oy)
            .enumerate()
            .for_each(|(z, slab)| {
                let (z0, z1, wz) = tz[z];
                for (y, row) in slab.chunks_mut(ox).enumerate() {
                    let (y0, y1, wy) = ty[y];
                    let r00 = nx * (y0 + ny * z0);
                    let r10 = nx * (y1 + ny * z0);
                    let r01 = nx * (y0 + ny * z1);
                    let r11 = nx * (y1 + ny * z1);
                    let (w00, w10) = ((1.0 - wy) * (1.0 - wz), wy * (1.0 - wz));
                    let (w01, w11) = ((1.0 - wy) * wz, wy * wz);
                    for (d, &(x0, x1, wx)) in row.iter_mut().zip(&tx) {
                        let g = |r: usize| {
                            let a = v[r + x0].to_f64() as f32;
                            let b = v[r + x1].to_f64() as f32;
                            a + (b - a) * wx
                        };
                        *d = g(r00) * w00 + g(r10) * w10 + g(r01) * w01 + g(r11) * w11;
                    }
                }
            });
        return dst;
    }
    dst.par_chunks_mut(ox * oy)
        .enumerate()
        .for_each(|(z, slab)| {
            for (y, row) in slab.chunks_mut(ox).enumerate() {
                for (x, d) in row.iter_mut().enumerate() {
                    let p = apply(m, [x as f64, y as f64, z as f64]);
                    let c = [
                        p[0].clamp(0.0, (nx - 1) as f64),
                        p[1].clamp(0.0, (ny - 1) as f64),
                        p[2].clamp(0.0, (nz - 1) as f64),
                    ];
                    let i0 = c.map(|q| q.floor() as usize);
                    let i1 = [
                        (i0[0] + 1).min(nx - 1),
                        (i0[1] + 1).min(ny - 1),
                        (i0[2] + 1).min(nz - 1),
                    ];
                    let w = [
                        c[0] - i0[0] as f64,
                        c[1] - i0[1] as f64,
                        c[2] - i0[2] as f64,
                    ]
                    .map(|q| q as f32);
                    let mut acc = 0f32;
                    for (zz, wz) in [(i0[2], 1.0 - w[2]), (i1[2], w[2])] {
                        for (yy, wy) in [(i0[1], 1.0 - w[1]), (i1[1], w[1])] {
                            let a = at(i0[0], yy, zz);
                            let b = at(i1[0], yy, zz);
                            acc += (a + (b - a) * w[0]) * wy * wz;
                        }
                    }
                    *d = acc;
                }
            }
        });
    dst
}

fn nearest_sample<T: Scalar>(v: &[T], shape: [usize; 3], m: &Affine, out: [usize; 3]) -> Vec<T> {
    let [nx, ny, nz] = shape;
    let [ox, oy, _] = out;
    let mut dst = vec![T::default(); out.iter().product()];
    if is_axis_aligned(m) {
        let tx = nearest_taps(nx, ox, m[0][0], m[0][3]);
        let ty = nearest_taps(ny, oy, m[1][1], m[1][3]);
        let tz = nearest_taps(nz, out[2], m[2][2], m[2][3]);
        dst.par_chunks_mut(ox * oy)
            .enumerate()
            .for_each(|(z, slab)| {
                for (y, row) in slab.chunks_mut(ox).enumerate() {
                    let r = nx * (ty[y] + ny * tz[z]);
                    for (d, &x) in row.iter_mut().zip(&tx) {
                        *d = v[r + x];
                    }
                }
            });
        return dst;
    }
    dst.par_chunks_mut(ox * oy)
        .enumerate()
        .for_each(|(z, slab)| {
            for (y, row) in slab.chunks_mut(ox).enumerate() {
                for (x, d) in row.iter_mut().enumerate() {
                    let p = apply(m, [x as f64, y as f64, z as f64]);
                    let idx = |q: f64, n: usize| {
                        ((q.clamp(0.0, (n - 1) as f64) + 0.5 + 1e-9).floor() as usize).min(n - 1)
                    };
                    *d = v[idx(p[0], nx) + nx * (idx(p[1], ny) + ny * idx(p[2], nz))];
                }
            }
        });
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_rule_matches_monai_examples() {
        // 3 mm → 1.5 mm: (n−1)·2 + 1 voxels; 3 mm → 2 mm: round(1.5(n−1) + 1).
        let g = Grid {
            shape: [122, 101, 112],
            affine: diag([3.0, 3.0, 3.0], [-178.0, 11.3, 94.3]),
        };
        let o = spacing_grid(&g, [1.5, 1.5, 2.0]).unwrap();
        // 1.5·111 + 1 = 167.5 → 168 (half to even).
        assert_eq!(o.shape, [243, 201, 168]);
        assert_eq!(
            [o.affine[0][3], o.affine[1][3], o.affine[2][3]],
            [-178.0, 11.3, 94.3]
        );
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
    }

    fn diag(s: [f64; 3], t: [f64; 3]) -> Affine {
        let mut a = super::super::volume::identity();
        for i in 0..3 {
            a[i][i] = s[i];
            a[i][3] = t[i];
        }
        a
    }

    #[test]
    fn general_path_matches_the_table_path() {
        // A hair of off-diagonal (1e-7) sends the same mapping through the
        // per-voxel 3×3 path; both must give the same samples.
        let shape = [9, 7, 5];
        let v: Vec<f32> = (0..9 * 7 * 5).map(|i| ((i * 37) % 101) as f32).collect();
        let mut m = diag([0.61, 1.37, 0.83], [0.2, -0.4, 0.1]);
        let out = [14, 6, 7];
        let a = linear_sample(&v, shape, &m, out);
        let na = nearest_sample(&v, shape, &m, out);
        m[0][1] = 1e-7;
        assert!(!is_axis_aligned(&m));
        let b = linear_sample(&v, shape, &m, out);
        let nb = nearest_sample(&v, shape, &m, out);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-3, "{x} vs {y}");
        }
        assert_eq!(na, nb);
    }

    #[test]
    fn inverse_mapping_zeroes_what_was_cropped_away() {
        // A 4³ label map of 1s covering x ∈ [10, 13] mm; the original grid
        // spans x ∈ [0, 19]: voxels beyond x = 13.5 mm are background.
        let lab = Volume::new(
            [4, 4, 4],
            diag([1.0; 3], [10.0, 0.0, 0.0]),
            Voxels::U8(vec![1; 64]),
        );
        let orig = Grid {
            shape: [20, 4, 4],
            affine: diag([1.0; 3], [0.0; 3]),
        };
        let back = to_original_grid(&lab, &orig).unwrap();
        let row: Vec<f64> = (0..20)
            .map(|x| back.data.get_f64(back.index(x, 1, 1)))
            .collect();
        let want: Vec<f64> = (0..20)
            .map(|x| if (10..=13).contains(&x) { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(row, want);
    }

    #[test]
    fn linear_reproduces_a_linear_ramp() {
        let shape = [10, 8, 6];
        let mut v = Vec::new();
        for z in 0..6 {
            for y in 0..8 {
                for x in 0..10 {
                    v.push((2 * x + 3 * y + 5 * z) as f32);
                }
            }
        }
        let vol = Volume::new(shape, diag([1.0, 1.0, 1.0], [0.0; 3]), Voxels::F32(v));
        let out = resample_spacing(&vol, [0.7, 1.3, 0.9], Interp::Linear).unwrap();
        let Voxels::F32(d) = &out.data else { panic!() };
        for z in 0..out.shape[2] {
            for y in 0..out.shape[1] {
                for x in 0..out.shape[0] {
                    let w = out.world([x as f64, y as f64, z as f64]);
                    let c = [w[0].min(9.0), w[1].min(7.0), w[2].min(5.0)];
                    let want = 2.0 * c[0] + 3.0 * c[1] + 5.0 * c[2];
                    assert!((d[out.index(x, y, z)] as f64 - want).abs() < 1e-3);
                }
            }
        }
    }
}
