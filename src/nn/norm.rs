//! Normalisation layers with backward: non-affine InstanceNorm3d (alone, followed by LeakyReLU,
//! and as the tail of MONAI's UnetResBlock) and LayerNorm over the last dim.
//!
//! On CPU (f32/f64) each is one fused op: it keeps only its inputs and its output for backward
//! and recomputes the row statistics there, and its backward is one pass. This matters because
//! Candle keeps every intermediate of the forward alive until the whole backward is done: the
//! composite `IN → LeakyReLU → add → LeakyReLU` of a full-resolution residual block kept six
//! tensors of 48×96³ floats (170 MB each at f48 96³) that PyTorch frees or overwrites in place.
//! Elsewhere (CUDA, other dtypes) each is one graph node too, its forward and backward built
//! from tensor ops ([`super::norm_generic`]).
//!
//! Statistics are accumulated in f64 (instance-norm rows are up to 96³ long).

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu_data::with_slices;
use super::fused::applies as fused;
use super::ops::{LeakyReluGrad, LEAKY_SLOPE, NORM_EPS};

/// Mean and 1/σ (biased variance + eps) of one row, two-pass in f64.
fn row_stats<T: candle_core::WithDType>(xs: &[T]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = xs.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + NORM_EPS).sqrt())
}

fn leaky(v: f64) -> f64 {
    if v > 0.0 {
        v
    } else {
        v * LEAKY_SLOPE
    }
}

/// The derivative of LeakyReLU read off its output (`y > 0` exactly where its input is).
fn leaky_slope_at<T: candle_core::WithDType>(y: T) -> f64 {
    if y.to_f64() > 0.0 {
        1.0
    } else {
        LEAKY_SLOPE
    }
}

/// Instance-norm gradient of one row: with x̂ the normalised input and g' the incoming gradient
/// (times the LeakyReLU slope read off `y` when given),
/// `dx = (g' − mean(g') − x̂·mean(g'·x̂)) / σ`.
fn instance_norm_grad_row<T: candle_core::WithDType>(
    xs: &[T],
    ys: Option<&[T]>,
    gs: &[T],
    out: &mut [T],
) {
    let n = xs.len() as f64;
    let (mean, inv) = row_stats(xs);
    let g_at = |i: usize| gs[i].to_f64() * ys.map_or(1.0, |ys| leaky_slope_at(ys[i]));
    let (mut sg, mut sgx) = (0f64, 0f64);
    for (i, x) in xs.iter().enumerate() {
        let g = g_at(i);
        sg += g;
        sgx += g * (x.to_f64() - mean) * inv;
    }
    let (mg, mgx) = (sg / n, sgx / n);
    for (i, (o, x)) in out.iter_mut().zip(xs).enumerate() {
        let xh = (x.to_f64() - mean) * inv;
        *o = T::from_f64((g_at(i) - mg - xh * mgx) * inv);
    }
}

// ---------------------------------------------------------------------------------------------
// InstanceNorm3d, optionally followed by LeakyReLU

/// Non-affine InstanceNorm3d (PyTorch defaults: biased variance over D,H,W per (b,c), eps 1e-5,
/// no running stats): x `[B,C,D,H,W]`.
pub fn instance_norm3d(x: &Tensor) -> Result<Tensor> {
    instance_norm_act(x, false)
}

/// `LeakyReLU(0.01)(InstanceNorm3d(x))`, as MONAI's UnetResBlock applies them after its first
/// convolution: one op on CPU, keeping only x (and its output) for backward.
pub fn instance_norm_leaky_relu(x: &Tensor) -> Result<Tensor> {
    instance_norm_act(x, true)
}

fn instance_norm_act(x: &Tensor, act: bool) -> Result<Tensor> {
    let (_, _, d, h, w) = x.dims5()?;
    if fused(x) {
        let op = InstanceNorm {
            row: d * h * w,
            act,
        };
        return x.contiguous()?.apply_op1(op);
    }
    super::norm_generic::instance_norm_act(x, act)
}

/// `x̂` and `1/σ` of x normalised over its last dim (biased variance + eps), from tensor ops:
/// the composites below, and the generic backwards that recompute them.
pub(super) fn normalised(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let inv = (xc.sqr()?.mean_keepdim(D::Minus1)? + NORM_EPS)?
        .sqrt()?
        .recip()?;
    Ok((xc.broadcast_mul(&inv)?, inv))
}

/// InstanceNorm3d from tensor ops (any device).
pub(super) fn instance_norm_composite(x: &Tensor) -> Result<Tensor> {
    let (b, c, d, h, w) = x.dims5()?;
    // [B,C,D,H,W] -> [B,C,M]
    normalised(&x.reshape((b, c, d * h * w))?)?
        .0
        .reshape((b, c, d, h, w))
}

/// Fused CPU instance norm over rows of `row` elements, then LeakyReLU if `act`.
struct InstanceNorm {
    row: usize,
    act: bool,
}

fn instance_norm_rows<T: candle_core::WithDType>(x: &[T], n: usize, act: bool) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(o, xs)| {
            let (mean, inv) = row_stats(xs);
            for (o, v) in o.iter_mut().zip(xs) {
                let y = (v.to_f64() - mean) * inv;
                *o = T::from_f64(if act { leaky(y) } else { y });
            }
        });
    out
}

impl candle_core::CustomOp1 for InstanceNorm {
    fn name(&self) -> &'static str {
        "instance-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, act) = (self.row, self.act);
        let out = with_slices!("instance-norm", [(x, s, l)], instance_norm_rows(x, n, act));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if fused(g) && g.dtype() == x.dtype() {
            let (x, y, g) = (x.detach(), y.detach(), g.detach().contiguous()?);
            let op = InstanceNormGrad {
                row: self.row,
                act: self.act,
            };
            return Ok(Some(x.apply_op3(&y, &g, op)?));
        }
        // Composite: through LeakyReLU (slope read off y), then the instance norm.
        let g = if self.act {
            let pos = y.gt(0.0)?.to_dtype(g.dtype())?;
            (g * ((pos * (1.0 - LEAKY_SLOPE))? + LEAKY_SLOPE)?)?
        } else {
            g.clone()
        };
        let rows = x.elem_count() / self.row;
        let (orig, shape) = (x.shape().clone(), (rows, self.row));
        let (x, g) = (x.reshape(shape)?, g.reshape(shape)?);
        let xc = x.broadcast_sub(&x.mean_keepdim(1)?)?;
        let inv = (xc.sqr()?.mean_keepdim(1)? + NORM_EPS)?.sqrt()?.recip()?;
        let xh = xc.broadcast_mul(&inv)?;
        let mg = g.mean_keepdim(1)?;
        let mgx = (&g * &xh)?.mean_keepdim(1)?;
        let dx = (g.broadcast_sub(&mg)? - xh.broadcast_mul(&mgx)?)?.broadcast_mul(&inv)?;
        Ok(Some(dx.reshape(orig)?))
    }
}

/// [`InstanceNorm`]'s backward on CPU, one parallel pass per row: (x, y, g) → dx (y is read only
/// for the LeakyReLU slope when `act`).
#[derive(Clone, Copy)]
struct InstanceNormGrad {
    row: usize,
    act: bool,
}

fn instance_norm_grad_rows<T: candle_core::WithDType>(
    x: &[T],
    y: Option<&[T]>,
    g: &[T],
    n: usize,
) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(n).enumerate().for_each(|(r, o)| {
        let span = r * n..(r + 1) * n;
        let ys = y.map(|y| &y[span.clone()]);
        instance_norm_grad_row(&x[span.clone()], ys, &g[span], o);
    });
    out
}

impl candle_core::CustomOp3 for InstanceNormGrad {
    fn name(&self) -> &'static str {
        "instance-norm-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sy: &CpuStorage,
        ly: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, act) = (self.row, self.act);
        let out = with_slices!(
            "instance-norm-grad",
            [(x, sx, lx), (y, sy, ly), (g, sg, lg)],
            instance_norm_grad_rows(x, act.then_some(y), g, n)
        );
        Ok((out, lx.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// The UnetResBlock tail: LeakyReLU(IN(a) + IN(r)) or LeakyReLU(IN(a) + r)

/// The end of MONAI's UnetResBlock (dynunet_block.py:98-111): `LeakyReLU(IN(a) + IN(r))` when
/// the residual went through the 1×1 convolution (`norm_residual`), else `LeakyReLU(IN(a) + r)`.
/// a and r are `[B,C,D,H,W]`. On CPU one op that keeps a, r and its output, no sums or normed
/// copies.
pub fn residual_block_tail(a: &Tensor, r: &Tensor, norm_residual: bool) -> Result<Tensor> {
    let (_, _, d, h, w) = a.dims5()?;
    if a.dims() != r.dims() {
        candle_core::bail!("residual tail: {:?} vs residual {:?}", a.dims(), r.dims())
    }
    if fused(a) && a.dtype() == r.dtype() {
        let op = ResidualTail {
            row: d * h * w,
            norm_residual,
        };
        return a.contiguous()?.apply_op2(&r.contiguous()?, op);
    }
    super::norm_generic::residual_block_tail(a, r, norm_residual)
}

struct ResidualTail {
    row: usize,
    norm_residual: bool,
}

fn residual_tail_rows<T: candle_core::WithDType>(a: &[T], r: &[T], n: usize, nr: bool) -> Vec<T> {
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(n)
        .zip(a.par_chunks(n).zip(r.par_chunks(n)))
        .for_each(|(o, (as_, rs))| {
            let (ma, ia) = row_stats(as_);
            let (mr, ir) = if nr { row_stats(rs) } else { (0.0, 1.0) };
            for ((o, a), r) in o.iter_mut().zip(as_).zip(rs) {
                let s = (a.to_f64() - ma) * ia + (r.to_f64() - mr) * ir;
                *o = T::from_f64(leaky(s));
            }
        });
    out
}

impl candle_core::CustomOp2 for ResidualTail {
    fn name(&self) -> &'static str {
        "residual-tail"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sr: &CpuStorage,
        lr: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, nr) = (self.row, self.norm_residual);
        let out = with_slices!(
            "residual-tail",
            [(a, sa, la), (r, sr, lr)],
            residual_tail_rows(a, r, n, nr)
        );
        Ok((out, la.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        r: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (a, r, y, g) = (a.detach(), r.detach(), y.detach(), g.detach().contiguous()?);
        // Both branches see the same g' = g·LeakyReLU'(sum), read off y.
        let in_grad = InstanceNormGrad {
            row: self.row,
            act: true,
        };
        let da = a.apply_op3(&y, &g, in_grad)?;
        let dr = if self.norm_residual {
            r.apply_op3(&y, &g, in_grad)?
        } else {
            // LeakyReLU's output has its input's sign, so its gradient can be read off y.
            y.apply_op2(&g, LeakyReluGrad)?
        };
        Ok((Some(da), Some(dr)))
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dim

/// Layer normalisation over the last dim with optional affine parameters (`torch.nn.LayerNorm`,
/// eps 1e-5), with a backward (unlike `candle_nn::LayerNorm`'s fused fast path).
pub fn layer_norm(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    if fused(x) {
        // Without affine parameters, constant ones and zeros: their gradients are dropped.
        let ones;
        let zeros;
        let w = match weight {
            Some(w) => w,
            None => {
                ones = Tensor::ones(c, x.dtype(), x.device())?;
                &ones
            }
        };
        let b = match bias {
            Some(b) => b,
            None => {
                zeros = Tensor::zeros(c, x.dtype(), x.device())?;
                &zeros
            }
        };
        if w.dtype() == x.dtype() && b.dtype() == x.dtype() {
            let (w, b) = (w.contiguous()?, b.contiguous()?);
            return x.contiguous()?.apply_op3(&w, &b, LayerNormOp);
        }
    }
    match (weight, bias) {
        (Some(w), Some(b)) => super::norm_generic::layer_norm(x, w, b),
        _ => layer_norm_composite(x, weight, bias),
    }
}

/// LayerNorm from tensor ops (any device).
pub(super) fn layer_norm_composite(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let mut y = normalised(x)?.0;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// Affine LayerNorm over the last dim (`torch.nn.LayerNorm(dim)`, eps 1e-5), with backward.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    /// Wraps existing `[C]` weight and bias tensors.
    pub fn new(weight: Tensor, bias: Tensor) -> Self {
        Self { weight, bias }
    }
}

impl candle_core::Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, Some(&self.weight), Some(&self.bias))
    }
}

/// Rows per partial sum of the weight and bias gradients: fixed, so that the sums are the same
/// bits on any number of threads.
const LN_ROWS_PER_PARTIAL: usize = 512;

/// Fused CPU LayerNorm: (x `[…,C]`, w `[C]`, b `[C]`) → y.
struct LayerNormOp;

fn layer_norm_rows<T: candle_core::WithDType>(x: &[T], w: &[T], b: &[T]) -> Vec<T> {
    let c = w.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(c * 64)
        .zip(x.par_chunks(c * 64))
        .for_each(|(o, xs)| {
            for (o, xs) in o.chunks_mut(c).zip(xs.chunks(c)) {
                let (mean, inv) = row_stats(xs);
                for (k, (o, v)) in o.iter_mut().zip(xs).enumerate() {
                    let xh = (v.to_f64() - mean) * inv;
                    *o = T::from_f64(xh * w[k].to_f64() + b[k].to_f64());
                }
            }
        });
    out
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = with_slices!(
            "layer-norm",
            [(x, sx, lx), (w, sw, lw), (b, sb, lb)],
            layer_norm_rows(x, w, b)
        );
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.detach(), w.detach(), g.detach().contiguous()?);
        let (len, c) = (x.elem_count(), w.elem_count());
        // One buffer: dx, then dw, then db.
        let all = x.apply_op3(&w, &g, LayerNormGrad)?;
        let dx = all.narrow(0, 0, len)?.reshape(x.shape())?;
        let dw = all.narrow(0, len, c)?;
        let db = all.narrow(0, len + c, c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// [`LayerNormOp`]'s backward: (x, w, g) → `[dx (flat) | dw | db]`, with
/// `dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) / σ` for ĝ = g·w, `dw = Σ g·x̂`, `db = Σ g` over rows.
struct LayerNormGrad;

fn layer_norm_grad<T: candle_core::WithDType>(x: &[T], w: &[T], g: &[T]) -> Vec<T> {
    let c = w.len();
    let per = c * LN_ROWS_PER_PARTIAL;
    let mut out = vec![T::zero(); x.len() + 2 * c];
    let (dx, _) = out.split_at_mut(x.len());
    // Each chunk of rows writes its dx and returns its partial dw, db (f64).
    let partials: Vec<Vec<f64>> = dx
        .par_chunks_mut(per)
        .zip(x.par_chunks(per).zip(g.par_chunks(per)))
        .map(|(dxs, (xs, gs))| {
            let mut acc = vec![0f64; 2 * c];
            for ((dx, xs), gs) in dxs.chunks_mut(c).zip(xs.chunks(c)).zip(gs.chunks(c)) {
                let (mean, inv) = row_stats(xs);
                let (mut sg, mut sgx) = (0f64, 0f64);
                for k in 0..c {
                    let xh = (xs[k].to_f64() - mean) * inv;
                    let gk = gs[k].to_f64();
                    acc[k] += gk * xh;
                    acc[c + k] += gk;
                    let gh = gk * w[k].to_f64();
                    sg += gh;
                    sgx += gh * xh;
                }
                let (mg, mgx) = (sg / c as f64, sgx / c as f64);
                for k in 0..c {
                    let xh = (xs[k].to_f64() - mean) * inv;
                    let gh = gs[k].to_f64() * w[k].to_f64();
                    dx[k] = T::from_f64((gh - mg - xh * mgx) * inv);
                }
            }
            acc
        })
        .collect();
    let mut sums = vec![0f64; 2 * c];
    for p in &partials {
        for (s, v) in sums.iter_mut().zip(p) {
            *s += v;
        }
    }
    for (o, s) in out[x.len()..].iter_mut().zip(sums) {
        *o = T::from_f64(s);
    }
    out
}

impl candle_core::CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = lw.shape().elem_count();
        let out = with_slices!(
            "layer-norm-grad",
            [(x, sx, lx), (w, sw, lw), (g, sg, lg)],
            layer_norm_grad(x, w, g)
        );
        Ok((out, Shape::from(lx.shape().elem_count() + 2 * c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ops::leaky_relu;
    use crate::nn::ops::tests::{check_grads, flat, max_diff, randn};

    #[test]
    fn instance_norm_normalises_each_channel_and_has_gradients() {
        let x = randn(&[2, 3, 2, 3, 2], 13);
        let y = instance_norm3d(&x).unwrap();
        let yv = flat(&y);
        let xv = flat(&x);
        for ch in 0..6 {
            let xs = &xv[ch * 12..(ch + 1) * 12];
            let mean = xs.iter().sum::<f64>() / 12.0;
            let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 12.0;
            for k in 0..12 {
                let want = (xs[k] - mean) / (var + 1e-5).sqrt();
                assert!((yv[ch * 12 + k] - want).abs() < 1e-12);
            }
        }
        assert!(max_diff(&yv, &flat(&instance_norm_composite(&x).unwrap())) < 1e-12);
        check_grads(&[x.clone()], &|t| instance_norm3d(&t[0]).unwrap(), 1e-5);
        check_grads(&[x], &|t| instance_norm_composite(&t[0]).unwrap(), 1e-5);
    }

    #[test]
    fn instance_norm_leaky_relu_equals_the_two_ops_and_has_gradients() {
        let x = randn(&[2, 3, 2, 3, 2], 21);
        let want = leaky_relu(&instance_norm_composite(&x).unwrap()).unwrap();
        let got = instance_norm_leaky_relu(&x).unwrap();
        assert!(max_diff(&flat(&got), &flat(&want)) < 1e-12);
        // Both signs occur, so both slopes are exercised.
        assert!(flat(&got).iter().any(|&v| v < 0.0) && flat(&got).iter().any(|&v| v > 0.0));
        check_grads(&[x], &|t| instance_norm_leaky_relu(&t[0]).unwrap(), 1e-5);
    }

    #[test]
    fn residual_tail_equals_the_composite_and_has_gradients() {
        let a = randn(&[1, 2, 3, 2, 3], 22);
        let r = randn(&[1, 2, 3, 2, 3], 23);
        for norm_residual in [true, false] {
            let rn = if norm_residual {
                instance_norm_composite(&r).unwrap()
            } else {
                r.clone()
            };
            let want = leaky_relu(&(instance_norm_composite(&a).unwrap() + rn).unwrap()).unwrap();
            let got = residual_block_tail(&a, &r, norm_residual).unwrap();
            assert!(max_diff(&flat(&got), &flat(&want)) < 1e-12);
            check_grads(
                &[a.clone(), r.clone()],
                &|t| residual_block_tail(&t[0], &t[1], norm_residual).unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn layer_norm_matches_definition_and_has_gradients() {
        // 1100 rows: more than two partial sums of the weight gradient.
        let x = randn(&[2, 550, 5], 14);
        let w = randn(&[5], 15);
        let b = randn(&[5], 16);
        let y = layer_norm(&x, Some(&w), Some(&b)).unwrap();
        let (xv, wv, bv, yv) = (flat(&x), flat(&w), flat(&b), flat(&y));
        for row in 0..1100 {
            let xs = &xv[row * 5..(row + 1) * 5];
            let mean = xs.iter().sum::<f64>() / 5.0;
            let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 5.0;
            for k in 0..5 {
                let want = (xs[k] - mean) / (var + 1e-5).sqrt() * wv[k] + bv[k];
                assert!((yv[row * 5 + k] - want).abs() < 1e-12);
            }
        }
        // Gradients: the fused op against the composite's autograd on the large input, and
        // both against finite differences on a small one.
        let vars: Vec<candle_core::Var> = [&x, &w, &b]
            .iter()
            .map(|t| candle_core::Var::from_tensor(t).unwrap())
            .collect();
        let r = randn(&[2, 550, 5], 17);
        let grads = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
            let (x, w, b) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let g = (f(x, w, b) * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            [x, w, b].map(|t| flat(g.get(t).unwrap()))
        };
        let fused = grads(&|x, w, b| layer_norm(x, Some(w), Some(b)).unwrap());
        let composite = grads(&|x, w, b| layer_norm_composite(x, Some(w), Some(b)).unwrap());
        for (f, c) in fused.iter().zip(&composite) {
            assert!(max_diff(f, c) < 1e-10, "{}", max_diff(f, c));
        }
        let (x, w, b) = (randn(&[3, 2, 5], 18), randn(&[5], 19), randn(&[5], 20));
        check_grads(
            &[x.clone(), w, b],
            &|t| layer_norm(&t[0], Some(&t[1]), Some(&t[2])).unwrap(),
            1e-5,
        );
        let plain = layer_norm(&x, None, None).unwrap();
        let want = layer_norm_composite(&x, None, None).unwrap();
        assert!(max_diff(&flat(&plain), &flat(&want)) < 1e-12);
        check_grads(&[x], &|t| layer_norm(&t[0], None, None).unwrap(), 1e-5);
    }
}
