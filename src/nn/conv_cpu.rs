//! A CPU [`Conv3dKernel`]: im2col of a few output rows at a time into a reused buffer small enough
//! to stay in L2 (≤ 1 MiB), then one `gemm` call per such tile, parallel over depth planes with
//! rayon. At 96³ a whole plane's columns are 48–96 MB, and writing them out and reading them back
//! for gemm's packing cost as much as the arithmetic: tiling halved the f48 96³ forward. The
//! output is written in place (no concatenation or accumulation passes).
//!
//! Tensors on other devices, or of other dtypes than f32/f64, fall back to [`Im2colConv3d`].

use super::ops::{Conv3dKernel, Im2colConv3d};
use super::SyncPtr;
use candle_core::{DType, Device, Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// The rayon + gemm CPU convolution (k3 s1 p1).
#[derive(Debug, Clone, Default)]
pub struct CpuConv3d {
    fallback: Im2colConv3d,
}

/// Upper bound on one forward column tile (see `forward_t`).
const COL_TILE_BYTES: usize = 1 << 20;

/// Weight-gradient work is cut into this many fixed plane ranges (enough to keep 16 threads busy).
const DW_CHUNKS: usize = 16;

/// Dims of a `[B,C,D,H,W]` volume.
#[derive(Clone, Copy)]
struct Vol {
    c: usize,
    d: usize,
    h: usize,
    w: usize,
}

/// Fills `col` (`[Ci·27, R·W]`, row `ci·27 + kd·9 + kh·3 + kw`) for output rows `rows` (R of
/// them) of plane `z` of the volume `x` (`[Ci,D,H,W]` of one batch item), with zero padding 1.
fn im2col_rows<T: Copy + Default>(
    x: &[T],
    v: Vol,
    z: usize,
    rows: std::ops::Range<usize>,
    col: &mut [T],
) {
    let (h, w) = (v.h, v.w);
    let (plane_len, n) = (h * w, rows.len() * w);
    let zero = T::default();
    for ci in 0..v.c {
        for kd in 0..3 {
            let zz = z as isize + kd as isize - 1;
            for kh in 0..3 {
                for kw in 0..3 {
                    let r = ci * 27 + kd * 9 + kh * 3 + kw;
                    let dst = &mut col[r * n..(r + 1) * n];
                    if zz < 0 || zz >= v.d as isize {
                        dst.fill(zero);
                        continue;
                    }
                    let plane = &x[(ci * v.d + zz as usize) * plane_len..][..plane_len];
                    for (r, y) in rows.clone().enumerate() {
                        let yy = y as isize + kh as isize - 1;
                        let row = &mut dst[r * w..(r + 1) * w];
                        if yy < 0 || yy >= h as isize {
                            row.fill(zero);
                            continue;
                        }
                        let src = &plane[yy as usize * w..][..w];
                        match kw {
                            0 => {
                                row[0] = zero;
                                row[1..].copy_from_slice(&src[..w - 1]);
                            }
                            1 => row.copy_from_slice(src),
                            _ => {
                                row[..w - 1].copy_from_slice(&src[1..]);
                                row[w - 1] = zero;
                            }
                        }
                    }
                }
            }
        }
    }
}

fn cpu_slice<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    // A contiguous copy; cheap next to the convolution.
    t.flatten_all()?.to_vec1::<T>()
}

fn forward_t<T>(x: &Tensor, w: &Tensor, one: T) -> Result<Tensor>
where
    T: candle_core::WithDType + Default + 'static,
{
    let (b, ci, d, h, wd) = x.dims5()?;
    let co = w.dim(0)?;
    let (xv, wv) = (cpu_slice::<T>(x)?, cpu_slice::<T>(w)?);
    let (n, k) = (h * wd, ci * 27);
    let v = Vol { c: ci, d, h, w: wd };
    let mut out = vec![T::default(); b * co * d * n];
    let optr = SyncPtr(out.as_mut_ptr());
    // Rows per tile: the column buffer stays within COL_TILE_BYTES (L2-resident between im2col
    // and gemm instead of a round trip through memory). Every output element still sums over
    // all of K in one gemm, so the result does not depend on the tiling.
    let tile = (COL_TILE_BYTES / (std::mem::size_of::<T>() * k * wd)).clamp(1, h);
    (0..b * d).into_par_iter().for_each_init(
        || vec![T::default(); k * tile * wd],
        |col, plane| {
            let (bi, z) = (plane / d, plane % d);
            for y0 in (0..h).step_by(tile) {
                let rows = y0..(y0 + tile).min(h);
                let nt = rows.len() * wd;
                im2col_rows(&xv[bi * ci * d * n..(bi + 1) * ci * d * n], v, z, rows, col);
                let optr = optr;
                // out[bi, :, z, y0.., :] as [Co, nt]: row stride D·N.
                let dst = unsafe { optr.0.add(bi * co * d * n + z * n + y0 * wd) };
                unsafe {
                    gemm::gemm(
                        co,
                        nt,
                        k,
                        dst,
                        1,
                        (d * n) as isize,
                        false,
                        wv.as_ptr(),
                        1,
                        k as isize,
                        col.as_ptr(),
                        1,
                        nt as isize,
                        one,
                        one,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    )
                }
            }
        },
    );
    Tensor::from_vec(out, (b, co, d, h, wd), &Device::Cpu)
}

fn grad_weight_t<T>(x: &Tensor, g: &Tensor, one: T) -> Result<Tensor>
where
    T: candle_core::WithDType + Default + 'static,
{
    let (b, ci, d, h, wd) = x.dims5()?;
    let co = g.dim(1)?;
    let (xv, gv) = (cpu_slice::<T>(x)?, cpu_slice::<T>(g)?);
    let (n, k) = (h * wd, ci * 27);
    let v = Vol { c: ci, d, h, w: wd };
    // Planes are summed in fixed chunks whose partial sums are added in chunk order, so the
    // result is bitwise the same for every thread count and schedule (a resumed training run
    // must equal an uninterrupted one). The chunk count does not depend on the thread count.
    // Row tiles as in `forward_t` (fixed by the shapes, so still thread-count independent).
    let tile = (COL_TILE_BYTES / (std::mem::size_of::<T>() * k * wd)).clamp(1, h);
    let planes = b * d;
    let chunk = planes.div_ceil(DW_CHUNKS).max(1);
    let partials: Vec<Vec<T>> = (0..planes.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let mut col = vec![T::default(); k * tile * wd];
            let mut acc = vec![T::default(); co * k];
            for plane in c * chunk..((c + 1) * chunk).min(planes) {
                let (bi, z) = (plane / d, plane % d);
                for y0 in (0..h).step_by(tile) {
                    let rows = y0..(y0 + tile).min(h);
                    let nt = rows.len() * wd;
                    let xb = &xv[bi * ci * d * n..(bi + 1) * ci * d * n];
                    im2col_rows(xb, v, z, rows, &mut col);
                    // acc[Co,K] += g[bi,:,z,tile] [Co,nt] × colᵀ [nt,K]
                    let lhs = gv[bi * co * d * n + z * n + y0 * wd..].as_ptr();
                    unsafe {
                        gemm::gemm(
                            co,
                            k,
                            nt,
                            acc.as_mut_ptr(),
                            1,
                            k as isize,
                            true,
                            lhs,
                            1,
                            (d * n) as isize,
                            col.as_ptr(),
                            nt as isize,
                            1,
                            one,
                            one,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        )
                    }
                }
            }
            acc
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut dw = parts.next().expect("at least one plane");
    for p in parts {
        for (x, y) in dw.iter_mut().zip(p) {
            *x += y;
        }
    }
    Tensor::from_vec(dw, (co, ci, 3, 3, 3), &Device::Cpu)
}

impl CpuConv3d {
    fn native(x: &Tensor) -> bool {
        super::fused::applies(x)
    }
}

impl Conv3dKernel for CpuConv3d {
    fn forward(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if !Self::native(x) || x.dtype() != w.dtype() {
            return self.fallback.forward(x, w);
        }
        match x.dtype() {
            DType::F32 => forward_t::<f32>(x, w, 1.0),
            _ => forward_t::<f64>(x, w, 1.0),
        }
    }

    fn grad_weight(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        if !Self::native(x) || x.dtype() != g.dtype() {
            return self.fallback.grad_weight(x, g);
        }
        match x.dtype() {
            DType::F32 => grad_weight_t::<f32>(x, g, 1.0),
            _ => grad_weight_t::<f64>(x, g, 1.0),
        }
    }
}
