//! Intensity windowing, as MONAI `ScaleIntensityRanged`.
//!
//! `b = (x − a_min) / (a_max − a_min) · (b_max − b_min) + b_min`, then
//! clipped to `[b_min, b_max]` when `clip` (monai/transforms/intensity/array.py,
//! `ScaleIntensityRange.__call__`). The experiment uses a_min −175, a_max 250,
//! b 0…1, clip: the abdominal soft-tissue window.

use rayon::prelude::*;

use super::volume::{Volume, Voxels};

/// A linear intensity window.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Input value mapped to `b_min`.
    pub a_min: f64,
    /// Input value mapped to `b_max`.
    pub a_max: f64,
    /// Output low.
    pub b_min: f64,
    /// Output high.
    pub b_max: f64,
    /// Clip to `[b_min, b_max]`.
    pub clip: bool,
}

impl Window {
    /// The seed experiment's window: HU [−175, 250] → [0, 1], clipped.
    pub const ABDOMEN: Window = Window {
        a_min: -175.0,
        a_max: 250.0,
        b_min: 0.0,
        b_max: 1.0,
        clip: true,
    };

    /// Applies the window to one value.
    #[inline]
    pub fn map(&self, x: f64) -> f64 {
        // MONAI: when a_max == a_min the result is x − a_min (then + b_min).
        let y = if self.a_max == self.a_min {
            x - self.a_min + self.b_min
        } else {
            (x - self.a_min) / (self.a_max - self.a_min) * (self.b_max - self.b_min) + self.b_min
        };
        if self.clip {
            y.clamp(self.b_min.min(self.b_max), self.b_max.max(self.b_min))
        } else {
            y
        }
    }
}

/// Applies `w` to every voxel; the result is f32.
pub fn scale_intensity_range(vol: &Volume, w: &Window) -> Volume {
    let data = crate::with_voxels!(&vol.data, v => v
        .par_iter()
        .map(|&x| w.map(super::volume::Scalar::to_f64(x)) as f32)
        .collect::<Vec<f32>>());
    Volume::new(vol.shape, vol.affine, Voxels::F32(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abdomen_window_endpoints_and_clip() {
        let w = Window::ABDOMEN;
        assert_eq!(w.map(-175.0), 0.0);
        assert_eq!(w.map(250.0), 1.0);
        assert_eq!(w.map(-1000.0), 0.0);
        assert_eq!(w.map(3000.0), 1.0);
        assert!((w.map(37.5) - 0.5).abs() < 1e-12);
    }
}
