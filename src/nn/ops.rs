//! 3D layers that Candle 0.11 lacks, and the few element-wise layers whose Candle versions drop
//! gradients: Conv3d (k3 s1 p1), 1×1×1 convolution, the k2 s2 patch embedding, ConvTranspose3d
//! (k2 s2), LeakyReLU, exact GELU and softmax (the normalisations are in [`super::norm`]).
//!
//! Everything here is built from Candle tensor ops (so it runs on any device and has autograd),
//! except the 3×3×3 convolution: it is computed on detached tensors by a [`Conv3dKernel`] and
//! attached to the graph by one node (`nn::carried`) whose backward calls the same kernel
//! (`dx = conv(g, flip(W)ᵀ)`, `dW = g ⋆ x`). This keeps no per-tap intermediate alive for
//! backward and lets a faster kernel replace [`Im2colConv3d`] without touching the model.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, D};
use std::sync::Arc;

use super::carried::{attach2, attach3, Backward2, Backward3};
use super::cpu_data::with_slices;
use super::matmul::{broadcast_matmul, matmul};
use super::softmax_cpu;

/// Variance epsilon of PyTorch's `nn.InstanceNorm3d` and `nn.LayerNorm` defaults.
pub const NORM_EPS: f64 = 1e-5;

/// Negative slope of MONAI's default UnetResBlock activation (dynunet_block.py, `act_name`).
pub const LEAKY_SLOPE: f64 = 0.01;

/// A 3×3×3, stride 1, zero-padding 1 convolution on detached tensors, in both directions needed by
/// backward. Implementations must be pure functions of their inputs.
pub trait Conv3dKernel: Send + Sync {
    /// `y[b,o,p] = Σ_{i,k} w[o,i,k] · x[b,i,p+k-1]`: x `[B,Ci,D,H,W]`, w `[Co,Ci,3,3,3]` →
    /// `[B,Co,D,H,W]`.
    fn forward(&self, x: &Tensor, w: &Tensor) -> Result<Tensor>;

    /// `dW[o,i,k] = Σ_{b,p} g[b,o,p] · x[b,i,p+k-1]`: x `[B,Ci,D,H,W]`, g `[B,Co,D,H,W]` →
    /// `[Co,Ci,3,3,3]`.
    fn grad_weight(&self, x: &Tensor, g: &Tensor) -> Result<Tensor>;
}

/// Chunked im2col + one matmul per chunk of output depth planes, written with Candle ops only
/// (CPU and CUDA). The column buffer is bounded by [`Im2colConv3d::max_col_elems`].
#[derive(Debug, Clone)]
pub struct Im2colConv3d {
    /// Upper bound on the number of elements of one im2col buffer (`B·Ci·27·planes·H·W`).
    pub max_col_elems: usize,
}

impl Default for Im2colConv3d {
    fn default() -> Self {
        // 64 Mi floats = 256 MiB per buffer.
        Self {
            max_col_elems: 64 << 20,
        }
    }
}

impl Im2colConv3d {
    /// Output depth planes per chunk for an input of `b·ci` channels over `h·w` pixels.
    fn planes_per_chunk(&self, b: usize, ci: usize, h: usize, w: usize, d: usize) -> usize {
        let per_plane = b * ci * 27 * h * w;
        (self.max_col_elems / per_plane.max(1)).clamp(1, d)
    }

    /// im2col of output planes `d0..d0+n` of the zero-padded input `xp` `[B,Ci,D+2,H+2,W+2]`:
    /// returns `[B, Ci·27, n·H·W]`, row `ci·27 + (kd·9 + kh·3 + kw)` (the order of
    /// `w.reshape(Co, Ci·27)`).
    fn columns(xp: &Tensor, d0: usize, n: usize, h: usize, w: usize) -> Result<Tensor> {
        let (b, ci, _, _, _) = xp.dims5()?;
        let slab = xp.narrow(2, d0, n + 2)?;
        let mut taps = Vec::with_capacity(27);
        for kd in 0..3 {
            for kh in 0..3 {
                for kw in 0..3 {
                    // [B,Ci,n,H,W]
                    let t = slab.narrow(2, kd, n)?.narrow(3, kh, h)?.narrow(4, kw, w)?;
                    taps.push(t);
                }
            }
        }
        // 27 × [B,Ci,n,H,W] -> [B,Ci,27,n,H,W] -> [B,Ci·27,n·H·W]
        Tensor::stack(&taps, 2)?.reshape((b, ci * 27, n * h * w))
    }
}

impl Conv3dKernel for Im2colConv3d {
    fn forward(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (b, ci, d, h, wd) = x.dims5()?;
        let co = w.dim(0)?;
        let xp = pad3(x)?;
        // [Co,Ci,3,3,3] -> [Co, Ci·27]
        let wm = w.reshape((co, ci * 27))?;
        let step = self.planes_per_chunk(b, ci, h, wd, d);
        let mut outs = Vec::new();
        let mut d0 = 0;
        while d0 < d {
            let n = step.min(d - d0);
            let col = Self::columns(&xp, d0, n, h, wd)?;
            // [Co, Ci·27] × [B, Ci·27, n·H·W] -> [B, Co, n·H·W] -> [B,Co,n,H,W]
            outs.push(broadcast_matmul(&wm, &col)?.reshape((b, co, n, h, wd))?);
            d0 += n;
        }
        if outs.len() == 1 {
            Ok(outs.pop().expect("one chunk"))
        } else {
            Tensor::cat(&outs, 2)
        }
    }

    fn grad_weight(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (b, ci, d, h, wd) = x.dims5()?;
        let co = g.dim(1)?;
        let xp = pad3(x)?;
        let step = self.planes_per_chunk(b, ci, h, wd, d);
        let mut acc: Option<Tensor> = None;
        let mut d0 = 0;
        while d0 < d {
            let n = step.min(d - d0);
            let col = Self::columns(&xp, d0, n, h, wd)?;
            // [B,Co,n,H,W] -> [B, Co, n·H·W]
            let gc = g.narrow(2, d0, n)?.reshape((b, co, n * h * wd))?;
            // [B,Co,M] × [B,M,Ci·27] -> [B,Co,Ci·27] -> [Co,Ci·27]
            let part = matmul(&gc, &col.transpose(1, 2)?)?.sum(0)?;
            acc = Some(match acc {
                None => part,
                Some(a) => (a + part)?,
            });
            d0 += n;
        }
        acc.expect("d > 0").reshape((co, ci, 3, 3, 3))
    }
}

/// Zero-pads the three spatial dims of `[B,C,D,H,W]` by one voxel on each side.
fn pad3(x: &Tensor) -> Result<Tensor> {
    x.pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .pad_with_zeros(4, 1, 1)
}

/// `W[o,i,kd,kh,kw] -> W'[i,o,2-kd,2-kh,2-kw]`: the kernel whose convolution with the output
/// gradient gives the input gradient of a k3 s1 p1 convolution.
fn flip_transpose(w: &Tensor) -> Result<Tensor> {
    let (co, ci, _, _, _) = w.dims5()?;
    // Flipping all three kernel dims reverses the flat tap index kd·9+kh·3+kw -> 26 - it.
    let rev: Vec<u32> = (0..27u32).rev().collect();
    let rev = Tensor::new(rev.as_slice(), w.device())?;
    // [Co,Ci,27] -> flipped [Co,Ci,27] -> [Ci,Co,27] -> [Ci,Co,3,3,3]
    w.reshape((co, ci, 27))?
        .index_select(&rev, 2)?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((ci, co, 3, 3, 3))
}

/// Backward of [`conv3d_k3`] through its kernel: `dx = conv(g, flip(W)ᵀ)`, `dW = g ⋆ x`.
struct Conv3dBackward {
    kernel: Arc<dyn Conv3dKernel>,
}

impl Backward2 for Conv3dBackward {
    fn name(&self) -> &'static str {
        "conv3d-k3"
    }

    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.detach(), w.detach(), g.detach().contiguous()?);
        let dx = self.kernel.forward(&g, &flip_transpose(&w)?)?;
        let dw = self.kernel.grad_weight(&x, &g)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The kernel models use unless told otherwise: [`super::CpuConv3d`] (rayon + gemm on CPU,
/// falling back to [`Im2colConv3d`] elsewhere).
pub fn default_conv3d_kernel() -> Arc<dyn Conv3dKernel> {
    Arc::new(super::CpuConv3d::default())
}

/// Conv3d, kernel 3, stride 1, padding 1, no bias, with autograd: x `[B,Ci,D,H,W]`,
/// w `[Co,Ci,3,3,3]` → `[B,Co,D,H,W]`.
pub fn conv3d_k3(x: &Tensor, w: &Tensor, kernel: &Arc<dyn Conv3dKernel>) -> Result<Tensor> {
    let (_, ci, _, _, _) = x.dims5()?;
    let (_, wci, kd, kh, kw) = w.dims5()?;
    if wci != ci || (kd, kh, kw) != (3, 3, 3) {
        candle_core::bail!(
            "conv3d_k3: input {:?} does not fit weight {:?}",
            x.dims(),
            w.dims()
        );
    }
    let y = kernel.forward(&x.detach(), &w.detach())?.contiguous()?;
    let backward = Conv3dBackward {
        kernel: kernel.clone(),
    };
    attach2(x, w, y, backward)
}

/// `x·wᵀ + b` for x `[N,in]`, w `[out,in]`, b `[out]`: one graph node instead of two (the
/// matmul's output would be kept alive beside the sum until backward ends, though backward
/// needs neither).
pub fn linear_with_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let y = matmul(&x.detach(), &w.detach().t()?)?
        .broadcast_add(&b.detach())?
        .contiguous()?;
    attach3(x, w, b, y, LinearBackward)
}

/// Backward of [`linear_with_bias`].
struct LinearBackward;

impl Backward3 for LinearBackward {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.detach(), w.detach(), g.detach());
        let dx = matmul(&g, &w)?;
        let dw = matmul(&g.t()?, &x)?;
        let db = g.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// 1×1×1 convolution: x `[B,Ci,D,H,W]`, w `[Co,Ci,1,1,1]`, optional bias `[Co]`.
pub fn conv3d_1x1(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, ci, d, h, wd) = x.dims5()?;
    let co = w.dim(0)?;
    // [Co,Ci,1,1,1] -> [Co,Ci]; [B,Ci,D,H,W] -> [B,Ci,M]
    let y = broadcast_matmul(&w.reshape((co, ci))?, &x.reshape((b, ci, d * h * wd))?)?;
    let y = match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, co, 1))?)?,
        None => y,
    };
    // [B,Co,M] -> [B,Co,D,H,W]
    y.reshape((b, co, d, h, wd))
}

/// Conv3d with kernel 2 = stride 2 and bias (MONAI's PatchEmbed, patchembedding.py): since the
/// patches do not overlap it is space-to-depth followed by a matmul. x `[B,Ci,D,H,W]` (even
/// dims), w `[Co,Ci,2,2,2]`, bias `[Co]` → `[B,Co,D/2,H/2,W/2]`.
pub fn patch_embed_k2(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, ci, d, h, wd) = x.dims5()?;
    let co = w.dim(0)?;
    let (d2, h2, w2) = (d / 2, h / 2, wd / 2);
    // [B,Ci,D,H,W] -> [B,Ci,D/2,2,H/2,2,W/2,2] -> [B,D/2,H/2,W/2,Ci,2,2,2] -> [B,N,Ci·8]
    let p = x
        .reshape(vec![b, ci, d2, 2, h2, 2, w2, 2])?
        .permute([0usize, 2, 4, 6, 1, 3, 5, 7])?
        .contiguous()?
        .reshape((b, d2 * h2 * w2, ci * 8))?;
    // [Co,Ci,2,2,2] -> [Co,Ci·8]; [B,N,Ci·8] × [Ci·8,Co] -> [B,N,Co]
    let y = broadcast_matmul(&p, &w.reshape((co, ci * 8))?.t()?)?.broadcast_add(bias)?;
    // [B,N,Co] -> [B,Co,N] -> [B,Co,D/2,H/2,W/2]
    y.transpose(1, 2)?
        .contiguous()?
        .reshape((b, co, d2, h2, w2))
}

/// ConvTranspose3d with kernel 2 = stride 2, no padding, no bias (MONAI's UnetrUpBlock): a matmul
/// followed by depth-to-space. x `[B,Ci,D,H,W]`, w `[Ci,Co,2,2,2]` (PyTorch layout) →
/// `[B,Co,2D,2H,2W]`.
pub fn conv_transpose3d_k2(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, ci, d, h, wd) = x.dims5()?;
    let co = w.dim(1)?;
    // [Ci,Co,2,2,2] -> [Ci,Co·8] -> [Co·8,Ci]
    let wm = w.reshape((ci, co * 8))?.t()?;
    // [Co·8,Ci] × [B,Ci,M] -> [B,Co·8,M]
    let y = broadcast_matmul(&wm, &x.reshape((b, ci, d * h * wd))?)?;
    // [B,Co,2,2,2,D,H,W] -> [B,Co,D,2,H,2,W,2] -> [B,Co,2D,2H,2W]
    y.reshape(vec![b, co, 2, 2, 2, d, h, wd])?
        .permute([0usize, 1, 5, 2, 6, 3, 7, 4])?
        .contiguous()?
        .reshape((b, co, 2 * d, 2 * h, 2 * wd))
}

/// `cat([ConvTranspose3d_k2(x, w), skip], 1)`, the start of MONAI's UnetrUpBlock, as one graph
/// node: at full resolution the separate matmul output, upsampled tensor and concatenation
/// were three tensors of 48×96³+ floats kept until backward ends; now only the concatenation.
/// x `[B,Ci,D,H,W]`, w `[Ci,Co,2,2,2]`, skip `[B,Cs,2D,2H,2W]` → `[B,Co+Cs,2D,2H,2W]`.
pub fn conv_transpose3d_k2_cat(x: &Tensor, w: &Tensor, skip: &Tensor) -> Result<Tensor> {
    let up = conv_transpose3d_k2(&x.detach(), &w.detach())?;
    let y = Tensor::cat(&[&up, &skip.detach()], 1)?.contiguous()?;
    drop(up);
    attach3(x, w, skip, y, UpCatBackward)
}

/// Backward of [`conv_transpose3d_k2_cat`].
struct UpCatBackward;

impl Backward3 for UpCatBackward {
    fn name(&self) -> &'static str {
        "conv-transpose-cat"
    }

    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        skip: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.detach(), w.detach(), g.detach());
        let (b, ci, d, h, wd) = x.dims5()?;
        let co = w.dim(1)?;
        let cs = skip.dim(1)?;
        let dskip = g.narrow(1, co, cs)?.contiguous()?;
        // [B,Co,2D,2H,2W] -> [B,Co,D,2,H,2,W,2] -> [B,Co,2,2,2,D,H,W] -> [B,Co·8,M]
        let gu = g
            .narrow(1, 0, co)?
            .reshape(vec![b, co, d, 2, h, 2, wd, 2])?
            .permute([0usize, 1, 3, 5, 7, 2, 4, 6])?
            .contiguous()?
            .reshape((b, co * 8, d * h * wd))?;
        // forward: y = wmᵀ·x per batch with wm = w as [Ci,Co·8]
        let wm = w.reshape((ci, co * 8))?;
        let xm = x.reshape((b, ci, d * h * wd))?;
        let dx = broadcast_matmul(&wm, &gu)?.reshape((b, ci, d, h, wd))?;
        // dwm[i,k] = Σ_b,m x[b,i,m]·gu[b,k,m]
        let dw = matmul(&xm, &gu.transpose(1, 2)?)?
            .sum(0)?
            .reshape((ci, co, 2, 2, 2))?;
        Ok((Some(dx), Some(dw), Some(dskip)))
    }
}

/// LeakyReLU with MONAI's slope 0.01. On CPU (f32/f64) one fused op; elsewhere
/// `max(x, 0.01·x)`.
pub fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    if super::fused::applies(x) {
        x.contiguous()?.apply_op1(LeakyRelu)
    } else {
        x.maximum(&(x * LEAKY_SLOPE)?)
    }
}

/// Fused CPU LeakyReLU; backward `g · (x > 0 ? 1 : 0.01)`.
struct LeakyRelu;

fn leaky_rows<T>(x: &[T]) -> Vec<T>
where
    T: candle_core::WithDType + num_traits::Float,
{
    use rayon::prelude::*;
    let slope = <T as candle_core::WithDType>::from_f64(LEAKY_SLOPE);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(1 << 16)
        .zip(x.par_chunks(1 << 16))
        .for_each(|(o, xs)| {
            for (o, &v) in o.iter_mut().zip(xs) {
                *o = if v > T::zero() { v } else { v * slope };
            }
        });
    out
}

impl candle_core::CustomOp1 for LeakyRelu {
    fn name(&self) -> &'static str {
        "leaky-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = with_slices!("leaky-relu", [(x, s, l)], leaky_rows(x));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if g.device().is_cpu() && g.dtype() == x.dtype() {
            let (x, g) = (x.detach(), g.detach().contiguous()?);
            return Ok(Some(x.apply_op2(&g, LeakyReluGrad)?));
        }
        // factor = 0.01 + 0.99·[x > 0]
        let pos = x.gt(0.0)?.to_dtype(g.dtype())?;
        let factor = ((pos * (1.0 - LEAKY_SLOPE))? + LEAKY_SLOPE)?;
        Ok(Some((g * factor)?))
    }
}

/// [`LeakyRelu`]'s backward on CPU in one pass: (x, g) → `g · (x > 0 ? 1 : 0.01)`.
pub(crate) struct LeakyReluGrad;

fn leaky_grad_rows<T>(x: &[T], g: &[T]) -> Vec<T>
where
    T: candle_core::WithDType + num_traits::Float,
{
    use rayon::prelude::*;
    let slope = <T as candle_core::WithDType>::from_f64(LEAKY_SLOPE);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(1 << 16)
        .zip(x.par_chunks(1 << 16).zip(g.par_chunks(1 << 16)))
        .for_each(|(o, (xs, gs))| {
            for ((o, &v), &g) in o.iter_mut().zip(xs).zip(gs) {
                *o = if v > T::zero() { g } else { g * slope };
            }
        });
    out
}

impl candle_core::CustomOp2 for LeakyReluGrad {
    fn name(&self) -> &'static str {
        "leaky-relu-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = with_slices!(
            "leaky-relu-grad",
            [(x, sx, lx), (g, sg, lg)],
            leaky_grad_rows(x, g)
        );
        Ok((out, lx.shape().clone()))
    }
}

/// Exact (erf) GELU, as `torch.nn.GELU()`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// Softmax over the last dim with autograd (`candle_nn::ops::softmax_last_dim` has none). On CPU
/// (f32/f64) it is one fused parallel pass with an analytic backward; elsewhere it is composed
/// from tensor ops.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if super::fused::applies(x) {
        x.apply_op1(SoftmaxLast)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

/// Fused CPU softmax over the last dim; backward `dx = y·(g − Σ g·y)`.
struct SoftmaxLast;

impl candle_core::CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l.dims().last().copied().unwrap_or(1);
        let out = with_slices!("softmax-last", [(x, s, l)], softmax_cpu::softmax(x, n));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * g.broadcast_sub(&dot)?)?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic values in [-1, 1) from a small LCG (tests must not depend on a global RNG).
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn to5(t: &Tensor) -> Vec<Vec<Vec<Vec<Vec<f64>>>>> {
        let dims = t.dims().to_vec();
        let flat = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mut out =
            vec![vec![vec![vec![vec![0.0; dims[4]]; dims[3]]; dims[2]]; dims[1]]; dims[0]];
        for (i, v) in flat.into_iter().enumerate() {
            let mut r = i;
            let mut ix = [0usize; 5];
            for k in (0..5).rev() {
                ix[k] = r % dims[k];
                r /= dims[k];
            }
            out[ix[0]][ix[1]][ix[2]][ix[3]][ix[4]] = v;
        }
        out
    }

    /// Direct 3D convolution: stride 1, zero padding `pad`, kernel `k`.
    fn naive_conv3d(x: &Tensor, w: &Tensor, pad: isize) -> Vec<f64> {
        let (xv, wv) = (to5(x), to5(w));
        let (b, ci, d, h, wd) = x.dims5().unwrap();
        let (co, _, k, _, _) = w.dims5().unwrap();
        let mut out = Vec::new();
        for bb in 0..b {
            for o in 0..co {
                for z in 0..d {
                    for y in 0..h {
                        for xx in 0..wd {
                            let mut acc = 0.0;
                            for i in 0..ci {
                                for a in 0..k {
                                    for e in 0..k {
                                        for f in 0..k {
                                            let (pz, py, px) = (
                                                z as isize + a as isize - pad,
                                                y as isize + e as isize - pad,
                                                xx as isize + f as isize - pad,
                                            );
                                            if pz < 0 || py < 0 || px < 0 {
                                                continue;
                                            }
                                            let (pz, py, px) =
                                                (pz as usize, py as usize, px as usize);
                                            if pz >= d || py >= h || px >= wd {
                                                continue;
                                            }
                                            acc += xv[bb][i][pz][py][px] * wv[o][i][a][e][f];
                                        }
                                    }
                                }
                            }
                            out.push(acc);
                        }
                    }
                }
            }
        }
        out
    }

    pub(crate) fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    pub(crate) fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// Compares autograd gradients of `sum(f(inputs) * r)` with central finite differences at
    /// every coordinate of every input (f64, tiny shapes).
    pub(crate) fn check_grads(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor, tol: f64) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let r = randn(y.dims(), 99);
        let loss = |ts: &[Tensor]| -> f64 {
            (f(ts) * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let eps = 1e-5;
        for (vi, v) in vars.iter().enumerate() {
            let g = flat(grads.get(v.as_tensor()).expect("gradient exists"));
            let base = flat(v.as_tensor());
            for j in 0..base.len() {
                let shifted = |delta: f64| {
                    let mut vals = base.clone();
                    vals[j] += delta;
                    let t = Tensor::from_vec(vals, v.dims(), &Device::Cpu).unwrap();
                    let mut args: Vec<Tensor> = inputs.to_vec();
                    args[vi] = t;
                    loss(&args)
                };
                let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
                assert!(
                    (fd - g[j]).abs() <= tol * (1.0 + fd.abs()),
                    "input {vi} coord {j}: autograd {} vs finite difference {fd}",
                    g[j]
                );
            }
        }
    }

    #[test]
    fn conv3d_k3_matches_direct_convolution() {
        let x = randn(&[2, 3, 4, 5, 3], 1);
        let w = randn(&[4, 3, 3, 3, 3], 2);
        let kernel = default_conv3d_kernel();
        let y = conv3d_k3(&x, &w, &kernel).unwrap();
        assert_eq!(y.dims(), &[2, 4, 4, 5, 3]);
        assert!(max_diff(&flat(&y), &naive_conv3d(&x, &w, 1)) < 1e-12);
        // A tiny column budget forces one depth plane per chunk.
        let chunked: Arc<dyn Conv3dKernel> = Arc::new(Im2colConv3d { max_col_elems: 1 });
        let im2col: Arc<dyn Conv3dKernel> = Arc::new(Im2colConv3d::default());
        for k in [chunked, im2col] {
            let y1 = conv3d_k3(&x, &w, &k).unwrap();
            assert!(max_diff(&flat(&y1), &flat(&y)) < 1e-12);
        }
        // f32 path of the CPU kernel.
        let (x32, w32) = (
            x.to_dtype(DType::F32).unwrap(),
            w.to_dtype(DType::F32).unwrap(),
        );
        let y32 = conv3d_k3(&x32, &w32, &kernel).unwrap();
        assert!(max_diff(&flat(&y32), &flat(&y)) < 1e-5);
    }

    #[test]
    fn conv3d_k3_in_row_tiles_matches_direct_convolution() {
        // Ci·27·W·8 bytes = 64·27·160·8 > 1 MiB: the CPU kernel's column tile is one row, so
        // every plane runs as several im2col + gemm tiles (f64 and f32).
        let x = randn(&[1, 64, 2, 3, 160], 3);
        let w = randn(&[2, 64, 3, 3, 3], 4);
        let kernel = default_conv3d_kernel();
        let want = naive_conv3d(&x, &w, 1);
        assert!(max_diff(&flat(&conv3d_k3(&x, &w, &kernel).unwrap()), &want) < 1e-11);
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let y32 = conv3d_k3(&f32s(&x), &f32s(&w), &kernel).unwrap();
        assert!(max_diff(&flat(&y32.to_dtype(DType::F64).unwrap()), &want) < 1e-4);
        // the weight gradient in tiles against the (untiled, Candle-op) im2col kernel
        let g = randn(&[1, 2, 2, 3, 160], 5);
        let dw = kernel.grad_weight(&x, &g).unwrap();
        let dw_ref = Im2colConv3d::default().grad_weight(&x, &g).unwrap();
        assert!(max_diff(&flat(&dw), &flat(&dw_ref)) < 1e-11);
    }

    #[test]
    fn conv3d_k3_gradients_match_finite_differences() {
        let x = randn(&[2, 2, 3, 3, 4], 3);
        let w = randn(&[3, 2, 3, 3, 3], 4);
        let chunked: Arc<dyn Conv3dKernel> = Arc::new(Im2colConv3d { max_col_elems: 1 });
        let im2col: Arc<dyn Conv3dKernel> = Arc::new(Im2colConv3d::default());
        for kernel in [default_conv3d_kernel(), im2col, chunked] {
            check_grads(
                &[x.clone(), w.clone()],
                &|t| conv3d_k3(&t[0], &t[1], &kernel).unwrap(),
                1e-6,
            );
        }
    }

    #[test]
    fn cpu_conv3d_weight_gradient_is_bitwise_the_same_on_any_thread_count() {
        // 2 × 20 planes: more planes than the kernel's fixed chunks, so chunks hold several.
        let x = randn(&[2, 3, 20, 6, 5], 5).to_dtype(DType::F32).unwrap();
        let g = randn(&[2, 4, 20, 6, 5], 6).to_dtype(DType::F32).unwrap();
        let kernel = default_conv3d_kernel();
        let dw = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let t = pool.install(|| kernel.grad_weight(&x, &g).unwrap());
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let one = dw(1);
        for threads in [2, 3, 7] {
            for _ in 0..3 {
                assert_eq!(dw(threads), one, "{threads} threads");
            }
        }
        // And it is the weight gradient: against the f64 direct kernel.
        let want = Im2colConv3d::default()
            .grad_weight(
                &x.to_dtype(DType::F64).unwrap(),
                &g.to_dtype(DType::F64).unwrap(),
            )
            .unwrap();
        let got: Vec<f64> = one.iter().map(|&v| v as f64).collect();
        assert!(max_diff(&got, &flat(&want)) < 1e-4);
    }

    #[test]
    fn conv3d_1x1_matches_direct_convolution_and_gradients() {
        let x = randn(&[2, 3, 2, 3, 2], 5);
        let w = randn(&[4, 3, 1, 1, 1], 6);
        let b = randn(&[4], 7);
        let y = conv3d_1x1(&x, &w, Some(&b)).unwrap();
        let mut want = naive_conv3d(&x, &w, 0);
        let bv = flat(&b);
        let per = 2 * 3 * 2;
        for (i, v) in want.iter_mut().enumerate() {
            *v += bv[(i / per) % 4];
        }
        assert!(max_diff(&flat(&y), &want) < 1e-12);
        check_grads(
            &[x, w, b],
            &|t| conv3d_1x1(&t[0], &t[1], Some(&t[2])).unwrap(),
            1e-6,
        );
    }

    #[test]
    fn linear_with_bias_matches_definition_and_gradients() {
        let x = randn(&[5, 3], 40);
        let w = randn(&[4, 3], 41);
        let b = randn(&[4], 42);
        let y = flat(&linear_with_bias(&x, &w, &b).unwrap());
        let (xv, wv, bv) = (flat(&x), flat(&w), flat(&b));
        for r in 0..5 {
            for o in 0..4 {
                let want: f64 = bv[o] + (0..3).map(|i| xv[r * 3 + i] * wv[o * 3 + i]).sum::<f64>();
                assert!((y[r * 4 + o] - want).abs() < 1e-12);
            }
        }
        check_grads(
            &[x, w, b],
            &|t| linear_with_bias(&t[0], &t[1], &t[2]).unwrap(),
            1e-6,
        );
    }

    #[test]
    fn conv_transpose_cat_equals_the_two_ops_and_has_gradients() {
        let x = randn(&[2, 3, 2, 1, 2], 43);
        let w = randn(&[3, 2, 2, 2, 2], 44);
        let skip = randn(&[2, 2, 4, 2, 4], 45);
        let want = Tensor::cat(&[&conv_transpose3d_k2(&x, &w).unwrap(), &skip], 1).unwrap();
        let got = conv_transpose3d_k2_cat(&x, &w, &skip).unwrap();
        assert_eq!(got.dims(), &[2, 4, 4, 2, 4]);
        assert!(max_diff(&flat(&got), &flat(&want)) < 1e-15);
        check_grads(
            &[x, w, skip],
            &|t| conv_transpose3d_k2_cat(&t[0], &t[1], &t[2]).unwrap(),
            1e-6,
        );
    }

    #[test]
    fn patch_embed_matches_strided_convolution() {
        let x = randn(&[2, 2, 4, 2, 6], 8);
        let w = randn(&[3, 2, 2, 2, 2], 9);
        let b = randn(&[3], 10);
        let y = patch_embed_k2(&x, &w, &b).unwrap();
        assert_eq!(y.dims(), &[2, 3, 2, 1, 3]);
        // Stride-2 conv = stride-1 conv (no padding) sampled at even positions.
        let full = naive_conv3d(&x, &w, 0);
        // naive_conv3d keeps the input size (out-of-range taps are skipped).
        let (fd, fh, fw) = (4, 2, 6);
        let (xv, bv) = (to5(&y), flat(&b));
        for bb in 0..2 {
            for o in 0..3 {
                for z in 0..2 {
                    for yy in 0..1 {
                        for xx in 0..3 {
                            let idx = (((bb * 3 + o) * fd + 2 * z) * fh + 2 * yy) * fw + 2 * xx;
                            let got = xv[bb][o][z][yy][xx];
                            assert!((got - full[idx] - bv[o]).abs() < 1e-12);
                        }
                    }
                }
            }
        }
        check_grads(
            &[x, w, b],
            &|t| patch_embed_k2(&t[0], &t[1], &t[2]).unwrap(),
            1e-6,
        );
    }

    #[test]
    fn conv_transpose_matches_scatter_definition() {
        let x = randn(&[2, 3, 2, 1, 3], 11);
        let w = randn(&[3, 2, 2, 2, 2], 12);
        let y = conv_transpose3d_k2(&x, &w).unwrap();
        assert_eq!(y.dims(), &[2, 2, 4, 2, 6]);
        // y[b,o,2z+a,2y+e,2x+f] = Σ_i x[b,i,z,y,x] · w[i,o,a,e,f]
        let (xv, wv, yv) = (to5(&x), to5(&w), to5(&y));
        for b in 0..2 {
            for o in 0..2 {
                for z in 0..4 {
                    for yy in 0..2 {
                        for xx in 0..6 {
                            let want: f64 = (0..3)
                                .map(|i| {
                                    xv[b][i][z / 2][yy / 2][xx / 2]
                                        * wv[i][o][z % 2][yy % 2][xx % 2]
                                })
                                .sum();
                            assert!((yv[b][o][z][yy][xx] - want).abs() < 1e-12);
                        }
                    }
                }
            }
        }
        check_grads(
            &[x, w],
            &|t| conv_transpose3d_k2(&t[0], &t[1]).unwrap(),
            1e-6,
        );
    }

    #[test]
    fn activations_match_definitions_and_have_gradients() {
        let x = randn(&[17], 17);
        let (l, g) = (flat(&leaky_relu(&x).unwrap()), flat(&gelu(&x).unwrap()));
        for (i, v) in flat(&x).into_iter().enumerate() {
            assert!((l[i] - if v > 0.0 { v } else { 0.01 * v }).abs() < 1e-15);
            // GELU(x) = x·Φ(x) lies between min(x,0)-0.17 and max(x,0).
            assert!(g[i] <= v.max(0.0) + 1e-12 && g[i] >= -0.17);
        }
        let one = Tensor::new(&[1.0f64], &Device::Cpu).unwrap();
        // GELU(1) = Φ(1) = 0.8413447460685429 (exact erf form, not the tanh approximation).
        assert!((flat(&gelu(&one).unwrap())[0] - 0.8413447460685429).abs() < 1e-12);
        check_grads(&[x.clone()], &|t| gelu(&t[0]).unwrap(), 1e-6);
        check_grads(
            &[x.clone()],
            &|t| softmax_last(&t[0].reshape((1, 17)).unwrap()).unwrap(),
            1e-6,
        );
        check_grads(&[x.clone()], &|t| leaky_relu(&t[0]).unwrap(), 1e-6);
    }

    #[test]
    fn fused_softmax_matches_composite_and_has_gradients() {
        let x2 = randn(&[3, 7], 18);
        let want = flat(&candle_nn::ops::softmax(&x2, D::Minus1).unwrap());
        assert!(max_diff(&flat(&softmax_last(&x2).unwrap()), &want) < 1e-15);
        check_grads(&[x2], &|t| softmax_last(&t[0]).unwrap(), 1e-6);
    }
}
