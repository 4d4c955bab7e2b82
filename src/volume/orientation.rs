//! Axis codes and reorientation without interpolation (MONAI `Orientationd`).
//!
//! A voxel axis is labelled by the world direction it points to, as
//! nibabel's `aff2axcodes`: the identity affine is `RAS`, an LPS-stored CT
//! (DICOM order) is `LPS`. Reorienting permutes and flips the array and
//! updates the affine so every voxel keeps its world position
//! (`new_affine = affine · T`, T mapping new indices to old ones), which is
//! what MONAI's `Orientation` does via `nibabel.orientations.ornt_transform`.

use rayon::prelude::*;

use super::volume::{matmul, Affine, Volume};

/// Orientation errors.
#[derive(Debug, thiserror::Error)]
pub enum OrientationError {
    /// Not three distinct letters out of R/L, A/P, S/I.
    #[error(
        "invalid axis codes `{0}`: expected three letters, one each of R/L, A/P, S/I (e.g. `RAS`)"
    )]
    BadCodes(String),
    /// Two voxel axes point mostly along the same world axis.
    #[error("affine axes are degenerate: voxel axes {0} and {1} both point along world axis {2}")]
    Degenerate(usize, usize, usize),
}

/// Axis codes of an affine (nibabel `aff2axcodes`): for each voxel axis the
/// world axis it is closest to, and its sign.
pub fn axcodes(affine: &Affine) -> Result<[char; 3], OrientationError> {
    let (world, sign) = axis_map(affine)?;
    let mut out = ['?'; 3];
    for i in 0..3 {
        let pos = ['R', 'A', 'S'][world[i]];
        let neg = ['L', 'P', 'I'][world[i]];
        out[i] = if sign[i] > 0.0 { pos } else { neg };
    }
    Ok(out)
}

/// For each voxel axis: its world axis and sign.
fn axis_map(affine: &Affine) -> Result<([usize; 3], [f64; 3]), OrientationError> {
    let mut world = [0; 3];
    let mut sign = [1.0; 3];
    for j in 0..3 {
        // Normalise the column first so spacing does not bias the choice.
        let col = [affine[0][j], affine[1][j], affine[2][j]];
        let w = (0..3)
            .max_by(|&a, &b| col[a].abs().total_cmp(&col[b].abs()))
            .unwrap();
        world[j] = w;
        sign[j] = col[w].signum();
    }
    for a in 0..3 {
        for b in a + 1..3 {
            if world[a] == world[b] {
                return Err(OrientationError::Degenerate(a, b, world[a]));
            }
        }
    }
    Ok((world, sign))
}

/// Parses `RAS`, `LPS`, … into (world axis, sign) per target voxel axis.
fn parse_codes(codes: &str) -> Result<[(usize, f64); 3], OrientationError> {
    let bad = || OrientationError::BadCodes(codes.to_string());
    let chars: Vec<char> = codes.to_ascii_uppercase().chars().collect();
    if chars.len() != 3 {
        return Err(bad());
    }
    let mut out = [(0, 1.0); 3];
    for (i, c) in chars.iter().enumerate() {
        out[i] = match c {
            'R' => (0, 1.0),
            'L' => (0, -1.0),
            'A' => (1, 1.0),
            'P' => (1, -1.0),
            'S' => (2, 1.0),
            'I' => (2, -1.0),
            _ => return Err(bad()),
        };
    }
    if out[0].0 == out[1].0 || out[0].0 == out[2].0 || out[1].0 == out[2].0 {
        return Err(bad());
    }
    Ok(out)
}

/// How to reorient: target axis `j` reads source axis `perm[j]`, flipped
/// when `flip[j]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reorientation {
    /// Source axis for each target axis.
    pub perm: [usize; 3],
    /// Whether the target axis runs opposite to its source axis.
    pub flip: [bool; 3],
}

impl Reorientation {
    /// True when nothing moves.
    pub fn is_identity(&self) -> bool {
        self.perm == [0, 1, 2] && self.flip == [false; 3]
    }
}

/// The reorientation that brings `affine` to `codes`.
pub fn plan(affine: &Affine, codes: &str) -> Result<Reorientation, OrientationError> {
    let target = parse_codes(codes)?;
    let (world, sign) = axis_map(affine)?;
    let mut perm = [0; 3];
    let mut flip = [false; 3];
    for (j, &(w, s)) in target.iter().enumerate() {
        let src = (0..3)
            .find(|&i| world[i] == w)
            .expect("axis_map is a permutation");
        perm[j] = src;
        flip[j] = sign[src] != s;
    }
    Ok(Reorientation { perm, flip })
}

/// Reorients `vol` to `codes` (e.g. `"RAS"`): a copy with permuted/flipped
/// axes and the matching affine; no interpolation.
pub fn reorient(vol: &Volume, codes: &str) -> Result<Volume, OrientationError> {
    let p = plan(&vol.affine, codes)?;
    Ok(apply(vol, p))
}

/// Applies a [`Reorientation`].
pub fn apply(vol: &Volume, p: Reorientation) -> Volume {
    if p.is_identity() {
        return vol.clone();
    }
    let src_shape = vol.shape;
    let shape = [
        src_shape[p.perm[0]],
        src_shape[p.perm[1]],
        src_shape[p.perm[2]],
    ];
    // T: new index → old index. Column j is ±e_perm[j]; a flipped axis adds
    // (n_j − 1) to the old coordinate.
    let mut t = [[0.0; 4]; 4];
    t[3][3] = 1.0;
    for j in 0..3 {
        let i = p.perm[j];
        if p.flip[j] {
            t[i][j] = -1.0;
            t[i][3] = (shape[j] - 1) as f64;
        } else {
            t[i][j] = 1.0;
        }
    }
    let affine = matmul(&vol.affine, &t);
    let src_stride = [
        1isize,
        src_shape[0] as isize,
        (src_shape[0] * src_shape[1]) as isize,
    ];
    let mut stride = [0isize; 3];
    let mut base = 0isize;
    for j in 0..3 {
        let s = src_stride[p.perm[j]];
        if p.flip[j] {
            stride[j] = -s;
            base += (shape[j] as isize - 1) * s;
        } else {
            stride[j] = s;
        }
    }
    let [nx, ny, _] = shape;
    let data = crate::map_voxels!(&vol.data, v => {
        let mut out = vec![Default::default(); v.len()];
        out.par_chunks_mut(nx * ny).enumerate().for_each(|(z, slab)| {
            for y in 0..ny {
                let row = base + z as isize * stride[2] + y as isize * stride[1];
                let dst = &mut slab[y * nx..(y + 1) * nx];
                for (x, d) in dst.iter_mut().enumerate() {
                    *d = v[(row + x as isize * stride[0]) as usize];
                }
            }
        });
        out
    });
    Volume::new(shape, affine, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Voxels;

    #[test]
    fn lps_to_ras_keeps_world_positions() {
        let a: Affine = [
            [0.0, -0.8, 0.0, 10.0],
            [-0.7, 0.0, 0.0, 20.0],
            [0.0, 0.0, 2.5, -30.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let shape = [3, 4, 5];
        let v = Volume::new(shape, a, Voxels::I32((0..60).collect()));
        assert_eq!(axcodes(&a).unwrap(), ['P', 'L', 'S']);
        let r = reorient(&v, "RAS").unwrap();
        assert_eq!(axcodes(&r.affine).unwrap(), ['R', 'A', 'S']);
        assert_eq!(r.shape, [4, 3, 5]);
        // Each voxel of the result sits where the source voxel with its value sat.
        for z in 0..5 {
            for y in 0..3 {
                for x in 0..4 {
                    let val = r.data.get_f64(r.index(x, y, z)) as usize;
                    let (sx, sy, sz) = (val % 3, (val / 3) % 4, val / 12);
                    let w0 = v.world([sx as f64, sy as f64, sz as f64]);
                    let w1 = r.world([x as f64, y as f64, z as f64]);
                    for k in 0..3 {
                        assert!((w0[k] - w1[k]).abs() < 1e-9);
                    }
                }
            }
        }
    }
}
