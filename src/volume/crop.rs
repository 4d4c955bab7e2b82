//! Crop to the foreground bounding box, as MONAI `CropForegroundd`.
//!
//! MONAI selects voxels with `select_fn(img) = img > 0` on the *source*
//! image (in the experiment: after windowing, i.e. HU > a_min) and crops
//! image and label to the bounding box plus `margin` voxels
//! (monai/transforms/croppad/array.py `CropForeground`). Here the threshold
//! is explicit in the image's own units, so cropping HU data at −175 is the
//! same box. The affine's origin moves to the box's first voxel.

use super::volume::{apply, Scalar, Volume};

/// Inclusive-exclusive voxel box `[lo, hi)` per axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BBox {
    /// First voxel per axis.
    pub lo: [usize; 3],
    /// One past the last voxel per axis.
    pub hi: [usize; 3],
}

/// Bounding box of voxels `> threshold`, grown by `margin` and clamped to
/// the grid; None when no voxel qualifies (MONAI then returns the image as is).
pub fn foreground_bbox(vol: &Volume, threshold: f64, margin: usize) -> Option<BBox> {
    let [nx, ny, nz] = vol.shape;
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    crate::with_voxels!(&vol.data, v => {
        for z in 0..nz {
            for y in 0..ny {
                let row = &v[nx * (y + ny * z)..nx * (y + ny * z + 1)];
                let first = row.iter().position(|x| x.to_f64() > threshold);
                if let Some(f) = first {
                    let last = row.iter().rposition(|x| x.to_f64() > threshold).unwrap();
                    lo = [lo[0].min(f), lo[1].min(y), lo[2].min(z)];
                    hi = [hi[0].max(last + 1), hi[1].max(y + 1), hi[2].max(z + 1)];
                }
            }
        }
    });
    if lo[0] == usize::MAX {
        return None;
    }
    for i in 0..3 {
        lo[i] = lo[i].saturating_sub(margin);
        hi[i] = (hi[i] + margin).min(vol.shape[i]);
    }
    Some(BBox { lo, hi })
}

/// Cuts `vol` to `b`, moving the affine origin to the box's first voxel.
pub fn crop(vol: &Volume, b: &BBox) -> Volume {
    let [nx, ny, _] = vol.shape;
    let shape = [b.hi[0] - b.lo[0], b.hi[1] - b.lo[1], b.hi[2] - b.lo[2]];
    let data = crate::map_voxels!(&vol.data, v => {
        let mut out = Vec::with_capacity(shape.iter().product());
        for z in b.lo[2]..b.hi[2] {
            for y in b.lo[1]..b.hi[1] {
                let r = nx * (y + ny * z);
                out.extend_from_slice(&v[r + b.lo[0]..r + b.hi[0]]);
            }
        }
        out
    });
    let mut affine = vol.affine;
    let o = apply(&vol.affine, b.lo.map(|x| x as f64));
    for i in 0..3 {
        affine[i][3] = o[i];
    }
    Volume::new(shape, affine, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Voxels;

    #[test]
    fn bbox_and_origin() {
        let mut v = vec![-1000i16; 6 * 5 * 4];
        v[2 + 6 * (1 + 5 * 3)] = 40;
        v[4 + 6 * (3 + 5 * 1)] = 40;
        let mut a = crate::volume::Volume::new(
            [6, 5, 4],
            [
                [2.0, 0.0, 0.0, 1.0],
                [0.0, 2.0, 0.0, 0.0],
                [0.0, 0.0, 3.0, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
            Voxels::I16(v),
        );
        let b = foreground_bbox(&a, -175.0, 0).unwrap();
        assert_eq!(
            b,
            BBox {
                lo: [2, 1, 1],
                hi: [5, 4, 4]
            }
        );
        a = crop(&a, &b);
        assert_eq!(a.shape, [3, 3, 3]);
        assert_eq!(a.affine[0][3], 5.0);
        assert_eq!(a.affine[2][3], 3.0);
        assert_eq!(a.data.get_f64(a.index(0, 0, 2)), 40.0);
    }
}
