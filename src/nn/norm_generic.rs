//! The norms off the fused CPU path (CUDA, other dtypes): each one graph node, as on the CPU.
//!
//! Differentiated by Candle, a norm composed of tensor ops keeps every intermediate (mean,
//! centred copy, squares, the normalised copy, the activation's input) until backward ends: at
//! f12 64³ that was 0.39 GB of `[1,12,64³]` tensors in the generic graph. Here the forward runs
//! on detached inputs and is attached as one node ([`super::carried`]) whose backward recomputes
//! the row statistics and applies the closed form, with tensor ops on any device.

use candle_core::{Result, Tensor, D};

use super::carried::{attach1, attach2, attach3, Backward1, Backward2, Backward3};
use super::norm::{instance_norm_composite, layer_norm_composite, normalised};
use super::ops::{leaky_relu, LEAKY_SLOPE};

/// The gradient of x for the gradient `g` of `x̂` (normalised over the last dim):
/// `(g − mean(g) − x̂·mean(g·x̂)) / σ`.
fn norm_grad(xh: &Tensor, inv: &Tensor, g: &Tensor) -> Result<Tensor> {
    let mg = g.mean_keepdim(D::Minus1)?;
    let mgx = (g * xh)?.mean_keepdim(D::Minus1)?;
    g.broadcast_sub(&mg)?
        .sub(&xh.broadcast_mul(&mgx)?)?
        .broadcast_mul(inv)
}

/// LeakyReLU's derivative at v: 1 where v > 0, else 0.01.
fn leaky_slope(v: &Tensor) -> Result<Tensor> {
    v.gt(0.0)?
        .to_dtype(v.dtype())?
        .affine(1.0 - LEAKY_SLOPE, LEAKY_SLOPE)
}

/// `[B,C,D,H,W]` as `[B,C,D·H·W]`, the rows instance norm normalises.
fn rows(x: &Tensor) -> Result<Tensor> {
    let (b, c, d, h, w) = x.dims5()?;
    x.reshape((b, c, d * h * w))
}

/// InstanceNorm3d, then LeakyReLU if `act`.
pub(crate) fn instance_norm_act(x: &Tensor, act: bool) -> Result<Tensor> {
    let y = instance_norm_composite(&x.detach())?;
    let y = if act { leaky_relu(&y)? } else { y };
    attach1(x, y.contiguous()?, InstanceNormBackward { act })
}

struct InstanceNormBackward {
    act: bool,
}

impl Backward1 for InstanceNormBackward {
    fn name(&self) -> &'static str {
        "instance-norm-generic"
    }

    fn backward(&self, x: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (xh, inv) = normalised(&rows(&x.detach())?)?;
        let mut g = rows(&g.detach())?;
        if self.act {
            // LeakyReLU's input is x̂ itself.
            g = (g * leaky_slope(&xh)?)?;
        }
        Ok(Some(norm_grad(&xh, &inv, &g)?.reshape(x.shape())?))
    }
}

/// MONAI's UnetResBlock tail `LeakyReLU(IN(a) + IN(r))` (or `+ r` without `norm_residual`).
pub(crate) fn residual_block_tail(a: &Tensor, r: &Tensor, norm_residual: bool) -> Result<Tensor> {
    let (ad, rd) = (a.detach(), r.detach());
    let rn = if norm_residual {
        instance_norm_composite(&rd)?
    } else {
        rd
    };
    let y = leaky_relu(&(instance_norm_composite(&ad)? + rn)?)?;
    attach2(
        a,
        r,
        y.contiguous()?,
        ResidualTailBackward { norm_residual },
    )
}

struct ResidualTailBackward {
    norm_residual: bool,
}

impl Backward2 for ResidualTailBackward {
    fn name(&self) -> &'static str {
        "residual-tail-generic"
    }

    fn backward(
        &self,
        a: &Tensor,
        r: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (ah, ainv) = normalised(&rows(&a.detach())?)?;
        let r = rows(&r.detach())?;
        let rn = if self.norm_residual {
            Some(normalised(&r)?)
        } else {
            None
        };
        let summand = rn.as_ref().map_or(&r, |(rh, _)| rh);
        // Both branches see g' = g·LeakyReLU'(IN(a) + r').
        let g = (rows(&g.detach())? * leaky_slope(&(&ah + summand)?)?)?;
        let da = norm_grad(&ah, &ainv, &g)?.reshape(a.shape())?;
        let dr = match rn {
            Some((rh, rinv)) => norm_grad(&rh, &rinv, &g)?,
            None => g,
        };
        Ok((Some(da), Some(dr.reshape(a.shape())?)))
    }
}

/// Affine LayerNorm over the last dim: x `[…,C]`, w and b `[C]`.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let y = layer_norm_composite(&x.detach(), Some(&w.detach()), Some(&b.detach()))?;
    attach3(x, w, b, y.contiguous()?, LayerNormBackward)
}

struct LayerNormBackward;

impl Backward3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-generic"
    }

    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(D::Minus1)?;
        let n = x.elem_count() / c;
        let (xh, inv) = normalised(&x.detach().reshape((n, c))?)?;
        let g = g.detach().reshape((n, c))?;
        let dx = norm_grad(&xh, &inv, &g.broadcast_mul(&w.detach())?)?.reshape(x.shape())?;
        let dw = (&g * &xh)?.sum(0)?;
        let db = g.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ops::tests::{check_grads, flat, max_diff, randn};
    use crate::nn::with_generic_ops;
    use candle_core::Var;

    /// Value and gradients of `sum(f(inputs)·r)` through the generic node, against Candle's
    /// autograd of the tensor-op composite `want`; then the node against finite differences.
    fn same_as_composite(
        inputs: &[Tensor],
        got: &dyn Fn(&[Tensor]) -> Tensor,
        want: &dyn Fn(&[Tensor]) -> Tensor,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = want(&ts);
        let r = randn(y.dims(), 99);
        let grads = |f: &dyn Fn(&[Tensor]) -> Tensor| {
            with_generic_ops(|| {
                let y = f(&ts);
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gs: Vec<Vec<f64>> = ts.iter().map(|t| flat(g.get(t).unwrap())).collect();
                (flat(&y), gs)
            })
        };
        let ((yg, gg), (yw, gw)) = (grads(got), grads(want));
        assert!(max_diff(&yg, &yw) < 1e-12, "value {}", max_diff(&yg, &yw));
        for (a, b) in gg.iter().zip(&gw) {
            assert!(max_diff(a, b) < 1e-10, "gradient {}", max_diff(a, b));
        }
        with_generic_ops(|| check_grads(inputs, got, 1e-5));
    }

    #[test]
    fn generic_norms_equal_the_composites_and_finite_differences() {
        let x = randn(&[2, 3, 2, 3, 2], 31);
        for act in [false, true] {
            same_as_composite(
                &[x.clone()],
                &|t| instance_norm_act(&t[0], act).unwrap(),
                &|t| {
                    let y = instance_norm_composite(&t[0]).unwrap();
                    if act {
                        leaky_relu(&y).unwrap()
                    } else {
                        y
                    }
                },
            );
        }
        let (a, r) = (randn(&[1, 2, 3, 2, 3], 32), randn(&[1, 2, 3, 2, 3], 33));
        for nr in [true, false] {
            same_as_composite(
                &[a.clone(), r.clone()],
                &|t| residual_block_tail(&t[0], &t[1], nr).unwrap(),
                &|t| {
                    let rn = if nr {
                        instance_norm_composite(&t[1]).unwrap()
                    } else {
                        t[1].clone()
                    };
                    leaky_relu(&(instance_norm_composite(&t[0]).unwrap() + rn).unwrap()).unwrap()
                },
            );
        }
        let (x, w, b) = (randn(&[3, 4, 5], 34), randn(&[5], 35), randn(&[5], 36));
        same_as_composite(
            &[x, w, b],
            &|t| layer_norm(&t[0], &t[1], &t[2]).unwrap(),
            &|t| layer_norm_composite(&t[0], Some(&t[1]), Some(&t[2])).unwrap(),
        );
    }
}
