//! A CPU [`Conv3dKernel`]: per-depth-plane im2col into a reused buffer, then one `gemm` call per
//! plane, parallel over planes with rayon. Memory is one `Ci·27 × H·W` buffer per thread, and the
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

/// Fills `col` (`[Ci·27, H·W]`, row `ci·27 + kd·9 + kh·3 + kw`) for output plane `z` of the
/// volume `x` (`[Ci,D,H,W]` of one batch item), with zero padding 1.
fn im2col_plane<T: Copy + Default>(x: &[T], v: Vol, z: usize, col: &mut [T]) {
    let (h, w) = (v.h, v.w);
    let n = h * w;
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
                    let plane = &x[(ci * v.d + zz as usize) * n..][..n];
                    for y in 0..h {
                        let yy = y as isize + kh as isize - 1;
                        let row = &mut dst[y * w..(y + 1) * w];
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
    (0..b * d).into_par_iter().for_each_init(
        || vec![T::default(); k * n],
        |col, plane| {
            let (bi, z) = (plane / d, plane % d);
            im2col_plane(&xv[bi * ci * d * n..(bi + 1) * ci * d * n], v, z, col);
            let optr = optr;
            // out[bi, :, z, :] as [Co, N]: row stride D·N.
            let dst = unsafe { optr.0.add(bi * co * d * n + z * n) };
            unsafe {
                gemm::gemm(
                    co,
                    n,
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
                    n as isize,
                    one,
                    one,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
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
    let planes = b * d;
    let chunk = planes.div_ceil(DW_CHUNKS).max(1);
    let partials: Vec<Vec<T>> = (0..planes.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let mut col = vec![T::default(); k * n];
            let mut acc = vec![T::default(); co * k];
            for plane in c * chunk..((c + 1) * chunk).min(planes) {
                let (bi, z) = (plane / d, plane % d);
                im2col_plane(&xv[bi * ci * d * n..(bi + 1) * ci * d * n], v, z, &mut col);
                // acc[Co,K] += g[bi,:,z,:] [Co,N] × colᵀ [N,K]
                let lhs = gv[bi * co * d * n + z * n..].as_ptr();
                unsafe {
                    gemm::gemm(
                        co,
                        k,
                        n,
                        acc.as_mut_ptr(),
                        1,
                        k as isize,
                        true,
                        lhs,
                        1,
                        (d * n) as isize,
                        col.as_ptr(),
                        n as isize,
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
        x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
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
