//! The [`Volume`] type: a 3D voxel grid (x fastest, as NIfTI stores it) and
//! the 4×4 affine that maps voxel indices to world millimetres (RAS+).

/// A 4×4 affine, row-major: `world = A · [i, j, k, 1]ᵀ` (nibabel's convention).
pub type Affine = [[f64; 4]; 4];

/// Voxel element type, as stored on disk and in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// Unsigned 8-bit (NIfTI code 2).
    U8,
    /// Signed 8-bit (NIfTI code 256).
    I8,
    /// Signed 16-bit (NIfTI code 4).
    I16,
    /// Unsigned 16-bit (NIfTI code 512).
    U16,
    /// Signed 32-bit (NIfTI code 8).
    I32,
    /// 32-bit float (NIfTI code 16).
    F32,
    /// 64-bit float (NIfTI code 64).
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::F64 => 8,
        }
    }

    /// The NIfTI-1 `datatype` code.
    pub fn nifti_code(self) -> i16 {
        match self {
            DType::U8 => 2,
            DType::I8 => 256,
            DType::I16 => 4,
            DType::U16 => 512,
            DType::I32 => 8,
            DType::F32 => 16,
            DType::F64 => 64,
        }
    }

    /// The type for a NIfTI-1 `datatype` code, if supported.
    pub fn from_nifti_code(code: i16) -> Option<DType> {
        Some(match code {
            2 => DType::U8,
            256 => DType::I8,
            4 => DType::I16,
            512 => DType::U16,
            8 => DType::I32,
            16 => DType::F32,
            64 => DType::F64,
            _ => return None,
        })
    }

    /// numpy's name for the type (used in messages, matches nibabel's output).
    pub fn name(self) -> &'static str {
        match self {
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }
}

/// Typed voxel storage, x fastest (`index = x + nx·(y + ny·z)`).
#[derive(Debug, Clone, PartialEq)]
pub enum Voxels {
    /// `uint8` voxels (label maps).
    U8(Vec<u8>),
    /// `int8` voxels.
    I8(Vec<i8>),
    /// `int16` voxels (most CTs).
    I16(Vec<i16>),
    /// `uint16` voxels.
    U16(Vec<u16>),
    /// `int32` voxels.
    I32(Vec<i32>),
    /// `float32` voxels (resampled images).
    F32(Vec<f32>),
    /// `float64` voxels.
    F64(Vec<f64>),
}

/// Runs `$body` with `$v` bound to the inner `Vec` of any [`Voxels`] variant.
#[macro_export]
#[doc(hidden)]
macro_rules! with_voxels {
    ($vox:expr, $v:ident => $body:expr) => {
        match $vox {
            $crate::volume::Voxels::U8($v) => $body,
            $crate::volume::Voxels::I8($v) => $body,
            $crate::volume::Voxels::I16($v) => $body,
            $crate::volume::Voxels::U16($v) => $body,
            $crate::volume::Voxels::I32($v) => $body,
            $crate::volume::Voxels::F32($v) => $body,
            $crate::volume::Voxels::F64($v) => $body,
        }
    };
}

/// Maps any [`Voxels`] to the same variant, `$body` producing the new `Vec`.
#[macro_export]
#[doc(hidden)]
macro_rules! map_voxels {
    ($vox:expr, $v:ident => $body:expr) => {
        match $vox {
            $crate::volume::Voxels::U8($v) => $crate::volume::Voxels::U8($body),
            $crate::volume::Voxels::I8($v) => $crate::volume::Voxels::I8($body),
            $crate::volume::Voxels::I16($v) => $crate::volume::Voxels::I16($body),
            $crate::volume::Voxels::U16($v) => $crate::volume::Voxels::U16($body),
            $crate::volume::Voxels::I32($v) => $crate::volume::Voxels::I32($body),
            $crate::volume::Voxels::F32($v) => $crate::volume::Voxels::F32($body),
            $crate::volume::Voxels::F64($v) => $crate::volume::Voxels::F64($body),
        }
    };
}

/// A numeric voxel type: conversion to f64 for statistics and interpolation.
pub trait Scalar: Copy + Send + Sync + Default + PartialEq + 'static {
    /// The value as f64 (exact for every supported type).
    fn to_f64(self) -> f64;
}

macro_rules! scalar {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    )*};
}
scalar!(u8, i8, i16, u16, i32, f32, f64);

impl Voxels {
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            Voxels::U8(_) => DType::U8,
            Voxels::I8(_) => DType::I8,
            Voxels::I16(_) => DType::I16,
            Voxels::U16(_) => DType::U16,
            Voxels::I32(_) => DType::I32,
            Voxels::F32(_) => DType::F32,
            Voxels::F64(_) => DType::F64,
        }
    }

    /// Number of voxels.
    pub fn len(&self) -> usize {
        with_voxels!(self, v => v.len())
    }

    /// True when there are no voxels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Voxel `i` as f64.
    pub fn get_f64(&self, i: usize) -> f64 {
        with_voxels!(self, v => v[i].to_f64())
    }

    /// All voxels converted to f32 (copy).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Voxels::F32(v) => v.clone(),
            other => with_voxels!(other, v => v.iter().map(|x| x.to_f64() as f32).collect()),
        }
    }

    /// All voxels converted to f64 (copy).
    pub fn to_f64(&self) -> Vec<f64> {
        with_voxels!(self, v => v.iter().map(|x| x.to_f64()).collect())
    }

    /// Voxels as integer labels; float values are rounded (nearest-resampled
    /// labels are exact integers already).
    pub fn to_labels(&self) -> Vec<i64> {
        with_voxels!(self, v => v.iter().map(|x| x.to_f64().round() as i64).collect())
    }

    /// The raw bytes in little-endian order (the in-memory order on LE hosts).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        macro_rules! le {
            ($v:expr) => {{
                let mut out = Vec::with_capacity($v.len() * std::mem::size_of_val(&$v[0]));
                for x in $v.iter() {
                    out.extend_from_slice(&x.to_le_bytes());
                }
                out
            }};
        }
        if self.is_empty() {
            return Vec::new();
        }
        with_voxels!(self, v => le!(v))
    }
}

/// A 3D volume: voxels, their grid shape and the voxel → world affine.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    /// Grid size `[nx, ny, nz]`.
    pub shape: [usize; 3],
    /// Voxel index → world mm (RAS+), nibabel's `img.affine`.
    pub affine: Affine,
    /// The voxels, x fastest.
    pub data: Voxels,
}

impl Volume {
    /// A volume from parts; panics if `data` does not hold `shape` voxels
    /// (a programming error, not bad input).
    pub fn new(shape: [usize; 3], affine: Affine, data: Voxels) -> Volume {
        assert_eq!(
            shape[0] * shape[1] * shape[2],
            data.len(),
            "voxel count vs shape"
        );
        Volume {
            shape,
            affine,
            data,
        }
    }

    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the grid has no voxels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Linear index of voxel `(x, y, z)`.
    #[inline]
    pub fn index(&self, x: usize, y: usize, z: usize) -> usize {
        x + self.shape[0] * (y + self.shape[1] * z)
    }

    /// Voxel spacing (mm): the norms of the affine's first three columns,
    /// as nibabel's `header.get_zooms()` / MONAI's `affine_to_spacing`.
    pub fn spacing(&self) -> [f64; 3] {
        spacing(&self.affine)
    }

    /// Physical volume of one voxel in mm³ (|det| of the 3×3 part).
    pub fn voxel_volume(&self) -> f64 {
        det3(&linear(&self.affine)).abs()
    }

    /// World coordinates (mm) of the centre of voxel `(i, j, k)`.
    pub fn world(&self, ijk: [f64; 3]) -> [f64; 3] {
        apply(&self.affine, ijk)
    }
}

/// The identity affine.
pub fn identity() -> Affine {
    let mut a = [[0.0; 4]; 4];
    for (i, row) in a.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    a
}

/// Column norms of the 3×3 part: the voxel spacing.
pub fn spacing(a: &Affine) -> [f64; 3] {
    let mut s = [0.0; 3];
    for (j, sj) in s.iter_mut().enumerate() {
        *sj = (0..3).map(|i| a[i][j] * a[i][j]).sum::<f64>().sqrt();
    }
    s
}

/// The 3×3 linear part.
pub fn linear(a: &Affine) -> [[f64; 3]; 3] {
    let mut m = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = a[i][j];
        }
    }
    m
}

/// Applies an affine to a point.
pub fn apply(a: &Affine, p: [f64; 3]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (i, o) in out.iter_mut().enumerate() {
        *o = a[i][0] * p[0] + a[i][1] * p[1] + a[i][2] * p[2] + a[i][3];
    }
    out
}

/// Matrix product `a · b`.
pub fn matmul(a: &Affine, b: &Affine) -> Affine {
    let mut out = [[0.0; 4]; 4];
    for i in 0..4 {
        for j in 0..4 {
            out[i][j] = (0..4).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    out
}

/// Determinant of a 3×3 matrix.
pub fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// Inverse of a 3×3 matrix (None when singular).
pub fn inv3(m: &[[f64; 3]; 3]) -> Option<[[f64; 3]; 3]> {
    let d = det3(m);
    if d.abs() < 1e-12 {
        return None;
    }
    let mut r = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            // Cofactor of (j, i), i.e. the adjugate transposed.
            let (a, b) = ((j + 1) % 3, (j + 2) % 3);
            let (c, e) = ((i + 1) % 3, (i + 2) % 3);
            r[i][j] = (m[a][c] * m[b][e] - m[a][e] * m[b][c]) / d;
        }
    }
    Some(r)
}

/// Inverse of an affine (None when its linear part is singular).
pub fn inverse(a: &Affine) -> Option<Affine> {
    let r = inv3(&linear(a))?;
    let mut out = identity();
    for i in 0..3 {
        for j in 0..3 {
            out[i][j] = r[i][j];
        }
        out[i][3] = -(0..3).map(|k| r[i][k] * a[k][3]).sum::<f64>();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_round_trips() {
        let a: Affine = [
            [0.0, -2.0, 0.1, 10.0],
            [1.5, 0.0, 0.0, -3.0],
            [0.0, 0.2, 3.0, 7.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let p = matmul(&a, &inverse(&a).unwrap());
        for i in 0..4 {
            for j in 0..4 {
                let e = if i == j { 1.0 } else { 0.0 };
                assert!((p[i][j] - e).abs() < 1e-12, "{p:?}");
            }
        }
    }
}
