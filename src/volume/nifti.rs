//! A focused NIfTI-1 reader and writer (`.nii` and `.nii.gz`).
//!
//! Reading follows nibabel 5.x (`nibabel/nifti1.py`):
//! - the affine is the sform when `sform_code != 0`, else the qform when
//!   `qform_code != 0`, else the Analyze-style base affine
//!   (`Nifti1Header.get_best_affine`);
//! - `scl_slope` 0 or NaN means "no scaling" and a NaN `scl_inter` means 0
//!   (`Nifti1Header.get_slope_inter`); scaled data become floats
//!   (f64 for i32/f64 sources, f32 otherwise: exact for the 8/16-bit types);
//! - a 4D file with one volume (`dim[4] == 1`) is read as 3D.
//!
//! Writing puts the affine in both sform and qform (codes 1, "scanner"),
//! like nibabel's `set_sform` + `set_qform`, so every viewer sees the same
//! geometry whichever form it prefers. `.nii.gz` is written as parallel gzip
//! members (see [`super::gzip`]).

use std::path::{Path, PathBuf};

use super::gzip;
use super::volume::{det3, identity, inv3, linear, spacing, Affine, DType, Volume, Voxels};

/// A NIfTI file that cannot be read or written; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum NiftiError {
    /// The file could not be opened, read or written.
    #[error("`{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file ended early.
    #[error("`{path}`: truncated NIfTI file: expected {expected} bytes, found {found}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes (uncompressed) the header promises.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// The gzip layer is broken.
    #[error("`{path}`: {source}")]
    Gzip {
        /// The file.
        path: PathBuf,
        /// What gzip said.
        #[source]
        source: gzip::GzipError,
    },
    /// A header field is invalid.
    #[error("`{path}`: not a valid NIfTI-1 header: expected {expected}, found {found}")]
    Header {
        /// The file.
        path: PathBuf,
        /// What the field should be.
        expected: String,
        /// What it is.
        found: String,
    },
    /// Not a 3D volume.
    #[error("`{path}`: unsupported dimensions: expected a 3D volume (or 4D with one volume), found dim = {dims:?}\n\nhint: split 4D series into one file per volume")]
    UnsupportedDims {
        /// The file.
        path: PathBuf,
        /// `dim[0..=dim[0]]`.
        dims: Vec<i16>,
    },
    /// A datatype we do not read.
    #[error("`{path}`: unsupported NIfTI datatype {code}: expected one of uint8, int8, int16, uint16, int32, float32, float64")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The `datatype` code.
        code: i16,
    },
    /// Float voxels that are NaN or infinite.
    #[error("`{path}`: expected finite voxel values, found {count} NaN/infinite of {total} (first at voxel index {first})")]
    NotFinite {
        /// The file.
        path: PathBuf,
        /// Non-finite voxels.
        count: usize,
        /// All voxels.
        total: usize,
        /// Linear index of the first.
        first: usize,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, NiftiError>;

/// The header fields tsdistill uses, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// `dim[0..8]`.
    pub dim: [i16; 8],
    /// `datatype` code.
    pub datatype: i16,
    /// `pixdim[0..8]` (pixdim[0] is qfac).
    pub pixdim: [f32; 8],
    /// Byte offset of the voxel data.
    pub vox_offset: f32,
    /// Data scaling slope (raw).
    pub scl_slope: f32,
    /// Data scaling intercept (raw).
    pub scl_inter: f32,
    /// qform code.
    pub qform_code: i16,
    /// sform code.
    pub sform_code: i16,
    /// Quaternion b, c, d.
    pub quatern: [f32; 3],
    /// qform offsets x, y, z.
    pub qoffset: [f32; 3],
    /// sform rows.
    pub srow: [[f32; 4]; 3],
    /// File byte order was big-endian.
    pub big_endian: bool,
}

impl Header {
    /// The affine nibabel's `get_best_affine` returns.
    pub fn best_affine(&self) -> Affine {
        if self.sform_code != 0 {
            self.sform()
        } else if self.qform_code != 0 {
            self.qform()
        } else {
            self.base_affine()
        }
    }

    /// The sform as an affine.
    pub fn sform(&self) -> Affine {
        let mut a = identity();
        for i in 0..3 {
            for j in 0..4 {
                a[i][j] = self.srow[i][j] as f64;
            }
        }
        a
    }

    /// The qform as an affine (nibabel `get_qform`: quaternion → rotation,
    /// times `diag(pixdim[1..4])` with the last zoom times qfac).
    pub fn qform(&self) -> Affine {
        let [b, c, d] = self.quatern.map(|v| v as f64);
        // nibabel `fillpositive`: a = sqrt(1 - b² - c² - d²), 0 when that is
        // (slightly) negative from float32 rounding.
        let w2 = 1.0 - (b * b + c * c + d * d);
        let a = if w2 < 0.0 { 0.0 } else { w2.sqrt() };
        let r = quat_to_mat(a, b, c, d);
        let qfac = if self.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let zooms = [
            self.pixdim[1] as f64,
            self.pixdim[2] as f64,
            self.pixdim[3] as f64 * qfac,
        ];
        let mut out = identity();
        for i in 0..3 {
            for j in 0..3 {
                out[i][j] = r[i][j] * zooms[j];
            }
            out[i][3] = self.qoffset[i] as f64;
        }
        out
    }

    /// nibabel's fallback when neither form is set: centred grid, x flipped
    /// (`shape_zoom_affine(shape, zooms, x_flip=True)`).
    pub fn base_affine(&self) -> Affine {
        let mut a = identity();
        for i in 0..3 {
            let mut z = self.pixdim[i + 1] as f64;
            if i == 0 {
                z = -z;
            }
            let n = self.dim[i + 1].max(1) as f64;
            a[i][i] = z;
            a[i][3] = -(n - 1.0) / 2.0 * z;
        }
        a
    }
}

/// nibabel `quat2mat` (w, x, y, z) → rotation matrix.
fn quat_to_mat(w: f64, x: f64, y: f64, z: f64) -> [[f64; 3]; 3] {
    let n = w * w + x * x + y * y + z * z;
    if n < f64::EPSILON {
        return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    }
    let s = 2.0 / n;
    let (xs, ys, zs) = (x * s, y * s, z * s);
    let (wx, wy, wz) = (w * xs, w * ys, w * zs);
    let (xx, xy, xz) = (x * xs, x * ys, x * zs);
    let (yy, yz, zz) = (y * ys, y * zs, z * zs);
    [
        [1.0 - (yy + zz), xy - wz, xz + wy],
        [xy + wz, 1.0 - (xx + zz), yz - wx],
        [xz - wy, yz + wx, 1.0 - (xx + yy)],
    ]
}

/// Rotation → quaternion (b, c, d) with a ≥ 0, as `nifti_mat44_to_quatern`.
fn mat_to_quat(r: &[[f64; 3]; 3]) -> [f64; 3] {
    let (r11, r12, r13) = (r[0][0], r[0][1], r[0][2]);
    let (r21, r22, r23) = (r[1][0], r[1][1], r[1][2]);
    let (r31, r32, r33) = (r[2][0], r[2][1], r[2][2]);
    let t = r11 + r22 + r33 + 1.0;
    let (mut a, mut b, mut c, mut d);
    if t > 0.5 {
        a = 0.5 * t.sqrt();
        b = 0.25 * (r32 - r23) / a;
        c = 0.25 * (r13 - r31) / a;
        d = 0.25 * (r21 - r12) / a;
    } else {
        let xd = 1.0 + r11 - (r22 + r33);
        let yd = 1.0 + r22 - (r11 + r33);
        let zd = 1.0 + r33 - (r11 + r22);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r12 + r21) / b;
            d = 0.25 * (r13 + r31) / b;
            a = 0.25 * (r32 - r23) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r12 + r21) / c;
            d = 0.25 * (r23 + r32) / c;
            a = 0.25 * (r13 - r31) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r13 + r31) / d;
            c = 0.25 * (r23 + r32) / d;
            a = 0.25 * (r21 - r12) / d;
        }
        if a < 0.0 {
            (b, c, d) = (-b, -c, -d);
            a = -a;
        }
    }
    let _ = a;
    [b, c, d]
}

fn header_err(path: &Path, expected: impl Into<String>, found: impl Into<String>) -> NiftiError {
    NiftiError::Header {
        path: path.to_owned(),
        expected: expected.into(),
        found: found.into(),
    }
}

/// Decodes the 348-byte header.
pub fn parse_header(path: &Path, b: &[u8]) -> Result<Header> {
    if b.len() < 348 {
        return Err(NiftiError::Truncated {
            path: path.to_owned(),
            expected: 348,
            found: b.len(),
        });
    }
    let le = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let big_endian = match le {
        348 => false,
        _ if i32::from_be_bytes([b[0], b[1], b[2], b[3]]) == 348 => true,
        _ => return Err(header_err(path, "sizeof_hdr 348", le.to_string())),
    };
    let i16_at = |o: usize| {
        let v = [b[o], b[o + 1]];
        if big_endian {
            i16::from_be_bytes(v)
        } else {
            i16::from_le_bytes(v)
        }
    };
    let f32_at = |o: usize| {
        let v = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if big_endian {
            f32::from_be_bytes(v)
        } else {
            f32::from_le_bytes(v)
        }
    };
    let magic = &b[344..348];
    if magic != b"n+1\0" {
        let found = String::from_utf8_lossy(magic)
            .trim_end_matches('\0')
            .to_string();
        let hint = if magic == b"ni1\0" {
            " (a .hdr/.img pair)"
        } else {
            ""
        };
        return Err(header_err(
            path,
            "magic `n+1` (single-file NIfTI-1)",
            format!("`{found}`{hint}"),
        ));
    }
    let mut dim = [0i16; 8];
    let mut pixdim = [0f32; 8];
    for i in 0..8 {
        dim[i] = i16_at(40 + 2 * i);
        pixdim[i] = f32_at(76 + 4 * i);
    }
    let mut srow = [[0f32; 4]; 3];
    for (r, row) in srow.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = f32_at(280 + 16 * r + 4 * c);
        }
    }
    Ok(Header {
        dim,
        datatype: i16_at(70),
        pixdim,
        vox_offset: f32_at(108),
        scl_slope: f32_at(112),
        scl_inter: f32_at(116),
        qform_code: i16_at(252),
        sform_code: i16_at(254),
        quatern: [f32_at(256), f32_at(260), f32_at(264)],
        qoffset: [f32_at(268), f32_at(272), f32_at(276)],
        srow,
        big_endian,
    })
}

/// The 3D shape of a header, or [`NiftiError::UnsupportedDims`].
fn shape_3d(path: &Path, h: &Header) -> Result<[usize; 3]> {
    let nd = h.dim[0];
    let bad = || NiftiError::UnsupportedDims {
        path: path.to_owned(),
        dims: h.dim[..=(nd.clamp(0, 7) as usize)].to_vec(),
    };
    if !(3..=7).contains(&nd) {
        return Err(bad());
    }
    if (1..=3).any(|i| h.dim[i] < 1) || (4..=nd as usize).any(|i| h.dim[i] != 1) {
        return Err(bad());
    }
    Ok([h.dim[1] as usize, h.dim[2] as usize, h.dim[3] as usize])
}

/// Reads a `.nii` or `.nii.gz` (detected by content, not name).
pub fn read(path: impl AsRef<Path>) -> Result<Volume> {
    let path = path.as_ref();
    let raw = fs_err::read(path).map_err(|e| NiftiError::Io {
        path: path.to_owned(),
        source: e,
    })?;
    decode(path, &raw)
}

/// Reads only the header (decompresses the first bytes of a `.nii.gz`).
pub fn read_header(path: impl AsRef<Path>) -> Result<Header> {
    use std::io::Read;
    let path = path.as_ref();
    let io = |e| NiftiError::Io {
        path: path.to_owned(),
        source: e,
    };
    let f = fs_err::File::open(path).map_err(io)?;
    let mut first = [0u8; 2];
    let mut buf = Vec::with_capacity(348);
    let mut r = std::io::BufReader::new(f);
    let n = r.read(&mut first).map_err(io)?;
    let chained = std::io::Cursor::new(first[..n].to_vec()).chain(r);
    if gzip::is_gzip(&first[..n]) {
        flate2::read::MultiGzDecoder::new(chained)
            .take(348)
            .read_to_end(&mut buf)
            .map_err(io)?;
    } else {
        chained.take(348).read_to_end(&mut buf).map_err(io)?;
    }
    parse_header(path, &buf)
}

/// Decodes file bytes (`.nii`, or gzip of one) into a [`Volume`].
pub fn decode(path: &Path, raw: &[u8]) -> Result<Volume> {
    let gz_err = |e| NiftiError::Gzip {
        path: path.to_owned(),
        source: e,
    };
    // Fast path for our own multi-member files: the header is member 0, so
    // the voxels inflate in parallel straight into their typed buffer.
    if let Some(members) = gzip::our_members(raw) {
        if members.len() > 1 && members[0].size >= 348 {
            let mut head = vec![0u8; members[0].size];
            gzip::inflate_members(raw, &members[..1], &mut head).map_err(gz_err)?;
            let h = parse_header(path, &head)?;
            if !h.big_endian && h.vox_offset == members[0].size as f32 {
                let (shape, dtype) = layout(path, &h)?;
                let n: usize = shape.iter().product();
                let have: usize = members[1..].iter().map(|m| m.size).sum();
                if have < n * dtype.size() {
                    return Err(NiftiError::Truncated {
                        path: path.to_owned(),
                        expected: head.len() + n * dtype.size(),
                        found: head.len() + have,
                    });
                }
                if have == n * dtype.size() {
                    let mut data = zeroed(dtype, n);
                    gzip::inflate_members(raw, &members[1..], bytes_mut(&mut data))
                        .map_err(gz_err)?;
                    return finish(path, &h, shape, data);
                }
            }
        }
    }
    if gzip::is_gzip(raw) {
        if let Some(v) = decode_single_member(path, raw)? {
            return Ok(v);
        }
    }
    let owned;
    let bytes: &[u8] = if gzip::is_gzip(raw) {
        owned = gzip::decompress(raw, None).map_err(gz_err)?;
        &owned
    } else {
        raw
    };
    let h = parse_header(path, bytes)?;
    let (shape, dtype) = layout(path, &h)?;
    let off = h.vox_offset as usize;
    let n: usize = shape.iter().product();
    let expected = off + n * dtype.size();
    if bytes.len() < expected {
        return Err(NiftiError::Truncated {
            path: path.to_owned(),
            expected,
            found: bytes.len(),
        });
    }
    let data = to_voxels(&bytes[off..expected], dtype, h.big_endian);
    finish(path, &h, shape, data)
}

/// Fast path for a one-member `.nii.gz` (nibabel's, ITK's): the header is
/// streamed out of the first bytes, then the whole member is inflated in one
/// call into the voxels' own typed buffer (with the header in front, then
/// shifted down in place): no second 100 MB buffer, no copy between them.
/// None sends anything unusual (other byte order, odd offsets, damage,
/// several members) to the general path, which names the problem.
fn decode_single_member(path: &Path, raw: &[u8]) -> Result<Option<Volume>> {
    use std::io::Read;
    let Some(total) = gzip::single_member_size(raw) else {
        return Ok(None);
    };
    let mut head = Vec::with_capacity(348);
    let mut d = flate2::read::GzDecoder::new(raw).take(348);
    if d.read_to_end(&mut head).is_err() || head.len() < 348 {
        return Ok(None);
    }
    let Ok(h) = parse_header(path, &head) else {
        return Ok(None);
    };
    let Ok((shape, dtype)) = layout(path, &h) else {
        return Ok(None);
    };
    let (off, size) = (h.vox_offset as usize, dtype.size());
    let n: usize = shape.iter().product();
    if h.big_endian != cfg!(target_endian = "big") || off % size != 0 || total != off + n * size {
        return Ok(None);
    }
    let mut data = zeroed(dtype, off / size + n);
    if !gzip::inflate_single_into(raw, bytes_mut(&mut data)) {
        return Ok(None);
    }
    crate::with_voxels!(&mut data, v => { v.drain(..off / size); });
    finish(path, &h, shape, data).map(Some)
}

/// Shape and dtype of a header, with `vox_offset` validated.
fn layout(path: &Path, h: &Header) -> Result<([usize; 3], DType)> {
    let shape = shape_3d(path, h)?;
    let dtype = DType::from_nifti_code(h.datatype).ok_or(NiftiError::UnsupportedDtype {
        path: path.to_owned(),
        code: h.datatype,
    })?;
    if !(h.vox_offset >= 348.0 && h.vox_offset.fract() == 0.0) {
        return Err(header_err(
            path,
            "vox_offset ≥ 348, integral",
            h.vox_offset.to_string(),
        ));
    }
    Ok((shape, dtype))
}

/// Scaling, the finiteness check and the affine.
fn finish(path: &Path, h: &Header, shape: [usize; 3], data: Voxels) -> Result<Volume> {
    let data = apply_scaling(data, h.scl_slope, h.scl_inter);
    check_finite(path, &data)?;
    Ok(Volume::new(shape, h.best_affine(), data))
}

/// `n` zero voxels of `dtype` (calloc'd: pages are touched only when written).
fn zeroed(dtype: DType, n: usize) -> Voxels {
    match dtype {
        DType::U8 => Voxels::U8(vec![0; n]),
        DType::I8 => Voxels::I8(vec![0; n]),
        DType::I16 => Voxels::I16(vec![0; n]),
        DType::U16 => Voxels::U16(vec![0; n]),
        DType::I32 => Voxels::I32(vec![0; n]),
        DType::F32 => Voxels::F32(vec![0.0; n]),
        DType::F64 => Voxels::F64(vec![0.0; n]),
    }
}

/// The voxels' memory as bytes (native order).
fn bytes_mut(v: &mut Voxels) -> &mut [u8] {
    crate::with_voxels!(v, x => bytemuck::cast_slice_mut(x.as_mut_slice()))
}

/// The voxels' memory as bytes (native order).
fn bytes_of(v: &Voxels) -> &[u8] {
    crate::with_voxels!(v, x => bytemuck::cast_slice(x.as_slice()))
}

/// Raw bytes → typed voxels.
fn to_voxels(b: &[u8], dtype: DType, big_endian: bool) -> Voxels {
    if big_endian == cfg!(target_endian = "big") {
        // Same byte order as this machine: a memcpy, split over the cores
        // (it also takes the page faults of the fresh buffer).
        use rayon::prelude::*;
        let mut v = zeroed(dtype, b.len() / dtype.size());
        bytes_mut(&mut v)
            .par_chunks_mut(1 << 20)
            .zip(b.par_chunks(1 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s));
        return v;
    }
    macro_rules! conv {
        ($t:ty, $n:expr) => {{
            b.chunks_exact($n)
                .map(|c| {
                    let a: [u8; $n] = c.try_into().unwrap();
                    if big_endian {
                        <$t>::from_be_bytes(a)
                    } else {
                        <$t>::from_le_bytes(a)
                    }
                })
                .collect::<Vec<$t>>()
        }};
    }
    match dtype {
        DType::U8 => Voxels::U8(b.to_vec()),
        DType::I8 => Voxels::I8(b.iter().map(|&x| x as i8).collect()),
        DType::I16 => Voxels::I16(conv!(i16, 2)),
        DType::U16 => Voxels::U16(conv!(u16, 2)),
        DType::I32 => Voxels::I32(conv!(i32, 4)),
        DType::F32 => Voxels::F32(conv!(f32, 4)),
        DType::F64 => Voxels::F64(conv!(f64, 8)),
    }
}

/// nibabel's `get_slope_inter` + `get_fdata` scaling.
fn apply_scaling(data: Voxels, slope: f32, inter: f32) -> Voxels {
    let slope = if slope == 0.0 || slope.is_nan() {
        1.0
    } else {
        slope as f64
    };
    let inter = if inter.is_nan() { 0.0 } else { inter as f64 };
    if slope == 1.0 && inter == 0.0 {
        return data;
    }
    // Parallel: on a big scaled CT this loop costs as much as the inflate.
    use rayon::prelude::*;
    match data {
        Voxels::I32(v) => Voxels::F64(v.par_iter().map(|&x| x as f64 * slope + inter).collect()),
        Voxels::F64(v) => Voxels::F64(v.par_iter().map(|&x| x * slope + inter).collect()),
        other => {
            let f = |x: f64| (x * slope + inter) as f32;
            Voxels::F32(
                crate::with_voxels!(&other, v => v.par_iter().map(|&x| f(x as f64)).collect()),
            )
        }
    }
}

fn check_finite(path: &Path, data: &Voxels) -> Result<()> {
    let (count, first) = match data {
        Voxels::F32(v) => count_bad(v, |x| x.is_finite()),
        Voxels::F64(v) => count_bad(v, |x| x.is_finite()),
        _ => return Ok(()),
    };
    if count > 0 {
        return Err(NiftiError::NotFinite {
            path: path.to_owned(),
            count,
            total: data.len(),
            first,
        });
    }
    Ok(())
}

/// (how many fail `ok`, index of the first); parallel, it runs on every read.
fn count_bad<T: Sync>(v: &[T], ok: impl Fn(&T) -> bool + Sync) -> (usize, usize) {
    use rayon::prelude::*;
    let count = v.par_iter().filter(|x| !ok(x)).count();
    let first = if count > 0 {
        v.iter().position(|x| !ok(x)).unwrap_or(usize::MAX)
    } else {
        usize::MAX
    };
    (count, first)
}

/// Encodes the header (+ 4 empty extension bytes) for `vol`.
pub fn encode_header(vol: &Volume) -> Vec<u8> {
    let mut b = vec![0u8; 352];
    let put_i16 = |b: &mut [u8], o: usize, v: i16| b[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put_f32 = |b: &mut [u8], o: usize, v: f32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    b[0..4].copy_from_slice(&348i32.to_le_bytes());
    b[38] = b'r'; // `regular`, as nibabel writes
    let dtype = vol.data.dtype();
    let dims = [
        3i16,
        vol.shape[0] as i16,
        vol.shape[1] as i16,
        vol.shape[2] as i16,
        1,
        1,
        1,
        1,
    ];
    for (i, d) in dims.iter().enumerate() {
        put_i16(&mut b, 40 + 2 * i, *d);
    }
    put_i16(&mut b, 70, dtype.nifti_code());
    put_i16(&mut b, 72, (dtype.size() * 8) as i16);

    // qform from the affine, as nibabel `set_qform`: zooms are the column
    // norms; a negative determinant becomes qfac = -1 on the third axis.
    let a = &vol.affine;
    let zooms = spacing(a);
    let lin = linear(a);
    let mut r = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            r[i][j] = if zooms[j] > 0.0 {
                lin[i][j] / zooms[j]
            } else {
                0.0
            };
        }
    }
    let mut qfac = 1.0f32;
    if det3(&r) < 0.0 {
        qfac = -1.0;
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
    }
    let r = orthonormalize(r);
    let q = mat_to_quat(&r);
    let pixdim = [
        qfac,
        zooms[0] as f32,
        zooms[1] as f32,
        zooms[2] as f32,
        1.0,
        1.0,
        1.0,
        1.0,
    ];
    for (i, p) in pixdim.iter().enumerate() {
        put_f32(&mut b, 76 + 4 * i, *p);
    }
    put_f32(&mut b, 108, 352.0); // vox_offset
    put_f32(&mut b, 112, 1.0); // scl_slope
    put_f32(&mut b, 116, 0.0); // scl_inter
    b[123] = 2 | 8; // xyzt_units: mm, s
    let descrip = b"tsdistill";
    b[148..148 + descrip.len()].copy_from_slice(descrip);
    put_i16(&mut b, 252, 1); // qform_code: scanner
    put_i16(&mut b, 254, 1); // sform_code: scanner
    for (i, v) in q.iter().enumerate() {
        put_f32(&mut b, 256 + 4 * i, *v as f32);
    }
    for i in 0..3 {
        put_f32(&mut b, 268 + 4 * i, a[i][3] as f32);
    }
    for i in 0..3 {
        for j in 0..4 {
            put_f32(&mut b, 280 + 16 * i + 4 * j, a[i][j] as f32);
        }
    }
    b[344..348].copy_from_slice(b"n+1\0");
    b
}

/// Nearest rotation to `r` (a few Newton steps of the polar decomposition),
/// so a slightly sheared affine still gives a valid quaternion.
fn orthonormalize(mut r: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    for _ in 0..8 {
        let Some(inv) = inv3(&r) else { return r };
        let mut next = [[0.0; 3]; 3];
        for i in 0..3 {
            for j in 0..3 {
                next[i][j] = 0.5 * (r[i][j] + inv[j][i]);
            }
        }
        r = next;
    }
    r
}

/// Encodes a whole `.nii` file in memory.
pub fn encode(vol: &Volume) -> Vec<u8> {
    let mut out = encode_header(vol);
    out.extend_from_slice(&le_data(vol));
    out
}

/// The voxel bytes in little-endian order, borrowed on little-endian hosts.
fn le_data(vol: &Volume) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytes_of(&vol.data))
    } else {
        std::borrow::Cow::Owned(vol.data.to_le_bytes())
    }
}

/// Writes `vol`; a name ending in `.gz` is gzip-compressed (level 1, parallel).
pub fn write(path: impl AsRef<Path>, vol: &Volume) -> Result<()> {
    write_with_level(path, vol, 1)
}

/// [`write`] with an explicit gzip level (ignored for `.nii`).
pub fn write_with_level(path: impl AsRef<Path>, vol: &Volume, level: u32) -> Result<()> {
    use std::io::Write;
    let path = path.as_ref();
    let io = |e| NiftiError::Io {
        path: path.to_owned(),
        source: e,
    };
    let header = encode_header(vol);
    let data = le_data(vol);
    let mut f = fs_err::File::create(path).map_err(io)?;
    if path.extension().is_some_and(|e| e == "gz") {
        // The header is a member of its own (see `decode`'s fast path);
        // members go out as they are, not copied into one buffer first.
        for m in gzip::compress_parts(&[&header, &data], level) {
            f.write_all(&m).map_err(io)?;
        }
    } else {
        f.write_all(&header).map_err(io)?;
        f.write_all(&data).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qform_round_trips_rotations_and_flips() {
        // LPS-like flip, a permutation, and an oblique rotation.
        let c = 0.3f64.cos();
        let s = 0.3f64.sin();
        let affines: [Affine; 3] = [
            [
                [-0.8, 0.0, 0.0, 10.0],
                [0.0, -0.8, 0.0, 20.0],
                [0.0, 0.0, 2.5, -30.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
            [
                [0.0, 0.0, 3.0, 1.0],
                [-1.5, 0.0, 0.0, 2.0],
                [0.0, 2.0, 0.0, 3.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
            [
                [c, -s, 0.0, 0.0],
                [s, c, 0.0, 0.0],
                [0.0, 0.0, -2.0, 5.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        ];
        for a in affines {
            let vol = Volume::new([2, 2, 2], a, Voxels::U8(vec![0; 8]));
            let h = parse_header(Path::new("x"), &encode_header(&vol)).unwrap();
            let q = h.qform();
            for i in 0..3 {
                for j in 0..4 {
                    assert!((q[i][j] - a[i][j]).abs() < 1e-5, "{a:?} vs {q:?}");
                }
            }
        }
    }
}
