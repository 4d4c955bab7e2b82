//! DiceCE loss, exactly as MONAI's `DiceCELoss(to_onehot_y=True, softmax=True)`.
//!
//! MONAI (monai/losses/dice.py, `DiceLoss.forward` and `DiceCELoss.forward`):
//! - Dice term: `p = softmax(logits, dim=1)`, `g = one_hot(labels)`; per
//!   (batch, class), over the spatial dims only (`batch=False`):
//!   `1 - (2·Σpg + smooth_nr) / (Σp + Σg + smooth_dr)`, then the mean over
//!   B×C. Empty classes are *not* skipped: with Σg = 0 the term is ≈ 0 when
//!   the prediction is empty and ≈ 1 otherwise. `include_background=False`
//!   drops channel 0 from the Dice term only.
//! - CE term: `nn.CrossEntropyLoss()` on the raw logits with the integer
//!   target (`DiceCELoss.ce`), averaged over every voxel, all classes.
//! - total = λ_dice·Dice + λ_ce·CE, both λ = 1.
//!
//! On CPU (f32/f64) the whole loss is one autograd op ([`DiceCe`]): per-voxel
//! softmax, the per-(batch, class) sums and the cross-entropy in one pass with
//! f64 accumulation, and an analytic gradient in a second. Built from tensor
//! ops it is eleven `[B, C, N]` graph nodes that Candle keeps until backward
//! ends (0.55 GB at 14 classes and 96³; 4 GB at TotalSegmentator's 105).
//! Elsewhere it is composed from tensor ops. Candle trap there:
//! `candle_nn::ops::softmax_last_dim` has no backward, so the softmax is built
//! from `exp`/`sum` (which have one), with the per-voxel max subtracted for
//! stability. The max is detached: subtracting a constant does not change the
//! softmax, so its gradient is exactly zero and need not be traced.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::error::{Result, TrainError};
use crate::nn::carried::{attach1, Backward1};
use crate::nn::cpu_data::{slices, with_slice, Slice};

/// Options of [`dice_ce_loss`]; `Default` is MONAI's default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiceCeOptions {
    /// Whether channel 0 takes part in the Dice term (MONAI default `true`).
    pub include_background: bool,
    /// Added to the Dice numerator (MONAI `smooth_nr`, 1e-5).
    pub smooth_nr: f64,
    /// Added to the Dice denominator (MONAI `smooth_dr`, 1e-5).
    pub smooth_dr: f64,
    /// Weight of the Dice term (MONAI `lambda_dice`, 1).
    pub lambda_dice: f64,
    /// Weight of the cross-entropy term (MONAI `lambda_ce`, 1).
    pub lambda_ce: f64,
}

impl Default for DiceCeOptions {
    fn default() -> Self {
        DiceCeOptions {
            include_background: true,
            smooth_nr: 1e-5,
            smooth_dr: 1e-5,
            lambda_dice: 1.0,
            lambda_ce: 1.0,
        }
    }
}

/// The DiceCE loss of `logits` [B, C, D, H, W] (float) against `labels`
/// [B, 1, D, H, W] (any integer or float dtype holding class ids 0..C).
///
/// Returns a scalar tensor that can be back-propagated to the logits.
pub fn dice_ce_loss(logits: &Tensor, labels: &Tensor, opts: &DiceCeOptions) -> Result<Tensor> {
    let dims = logits.dims().to_vec();
    if dims.len() < 3 {
        return Err(TrainError::Shape {
            what: "logits of dice_ce_loss ([B, C, spatial…])".into(),
            expected: vec![0, 0, 0],
            found: dims,
        });
    }
    let (b, c) = (dims[0], dims[1]);
    let mut expected = dims.clone();
    expected[1] = 1;
    if labels.dims() != expected.as_slice() {
        return Err(TrainError::Shape {
            what: "labels of dice_ce_loss ([B, 1, spatial…])".into(),
            expected,
            found: labels.dims().to_vec(),
        });
    }
    let dtype = logits.dtype();
    // [B, C, N]: flatten the spatial dims once; every reduction below is over N.
    let x = logits.flatten_from(2)?;
    // [B, 1, N] class ids as u32 (ids ≥ C match no class, as in a one-hot of 0..C).
    let ids = labels
        .flatten_from(2)?
        .to_dtype(DType::F32)?
        .to_dtype(DType::U32)?;
    if crate::nn::fused::applies(&x) {
        let op = DiceCe {
            ids: Arc::new(ids.flatten_all()?.to_vec1::<u32>()?),
            b,
            c,
            opts: *opts,
            sums: Mutex::new(None),
        };
        return Ok(x.contiguous()?.apply_op1(op)?);
    }
    generic(&x, &ids, opts, b, c, dtype)
}

/// Off the fused CPU path (CUDA, other dtypes): the composite's value on detached logits,
/// attached as one graph node whose backward is the closed form of [`DiceCe::grad`] in tensor
/// ops. Differentiated by Candle, the composite kept eleven `[B, C, N]` tensors for backward.
fn generic(
    x: &Tensor,
    ids: &Tensor,
    opts: &DiceCeOptions,
    b: usize,
    c: usize,
    dtype: DType,
) -> Result<Tensor> {
    let loss = composite(&x.detach(), ids, opts, b, c, dtype)?;
    let backward = DiceCeGenericBackward {
        ids: ids.clone(),
        opts: *opts,
    };
    Ok(attach1(x, loss, backward)?)
}

/// [`generic`]'s backward: with p the softmax and g the one-hot `[B, C, N]`, per (b, c)
/// `α = −2w/den`, `β = w(2I + smooth_nr)/den²` (zero for an excluded background), then
/// `dx = p ⊙ (dp − Σ_c p ⊙ dp) + λ_ce (p − g)/(B·N)` with `dp = α·g + β`, times the incoming
/// gradient (as [`DiceCe::grad`]).
struct DiceCeGenericBackward {
    ids: Tensor,
    opts: DiceCeOptions,
}

impl Backward1 for DiceCeGenericBackward {
    fn name(&self) -> &'static str {
        "dice-ce-generic"
    }

    fn backward(&self, x: &Tensor, gl: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (x, o) = (x.detach(), &self.opts);
        let (b, c, n) = x.dims3()?;
        let (dtype, dev) = (x.dtype(), x.device());
        let onehot = one_hot(&self.ids, c, dtype)?;
        let e = x.broadcast_sub(&x.max_keepdim(1)?)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(1)?)?;
        let c0 = usize::from(!o.include_background);
        let w = o.lambda_dice / (b * (c - c0)) as f64;
        let inter = (&p * &onehot)?.sum_keepdim(2)?;
        let den = ((p.sum_keepdim(2)? + onehot.sum_keepdim(2)?)? + o.smooth_dr)?;
        let keep: Vec<f64> = (0..c).map(|k| f64::from(u8::from(k >= c0))).collect();
        let keep = Tensor::from_vec(keep, (1, c, 1), dev)?.to_dtype(dtype)?;
        let alpha = (den.recip()? * (-2.0 * w))?.broadcast_mul(&keep)?;
        let beta = (((inter * 2.0)? + o.smooth_nr)? * w)?
            .div(&den.sqr()?)?
            .broadcast_mul(&keep)?;
        let dp = onehot.broadcast_mul(&alpha)?.broadcast_add(&beta)?;
        let dot = (&p * &dp)?.sum_keepdim(1)?;
        // 1 where the voxel's id is a class: no cross-entropy term elsewhere
        let valid = onehot.sum_keepdim(1)?;
        let ce = ((&p - &onehot)?.broadcast_mul(&valid)? * (o.lambda_ce / (b * n) as f64))?;
        let dx = ((&p * dp.broadcast_sub(&dot)?)? + ce)?;
        let gl = gl.detach().to_dtype(dtype)?.reshape((1, 1, 1))?;
        Ok(Some(dx.broadcast_mul(&gl)?))
    }
}

/// One-hot `[B, C, N]` of ids `[B, 1, N]` by comparing with 0..C (an id ≥ C matches no class).
fn one_hot(ids: &Tensor, c: usize, dtype: DType) -> candle_core::Result<Tensor> {
    let classes = Tensor::arange(0u32, c as u32, ids.device())?.reshape((1, c, 1))?;
    ids.broadcast_eq(&classes)?.to_dtype(dtype)
}

/// [`dice_ce_loss`] from tensor ops, on x `[B, C, N]` and ids `[B, 1, N]`.
fn composite(
    x: &Tensor,
    ids: &Tensor,
    opts: &DiceCeOptions,
    b: usize,
    c: usize,
    dtype: DType,
) -> Result<Tensor> {
    let onehot = one_hot(ids, c, dtype)?;

    // 1. Log-softmax over the channel dim with max subtraction.
    let max = x.max_keepdim(1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let exp = shifted.exp()?;
    let sum = exp.sum_keepdim(1)?;
    let prob = exp.broadcast_div(&sum)?;
    let log_prob = shifted.broadcast_sub(&sum.log()?)?;

    // 2. Cross-entropy: mean over all B·N voxels of -log p[target].
    let n_vox = (b * x.dim(2)?) as f64;
    let ce = ((&onehot * &log_prob)?.sum_all()? * (-1.0 / n_vox))?;

    // 3. Dice per (b, c) over N, optionally without the background channel.
    let (prob, onehot) = if opts.include_background {
        (prob, onehot)
    } else {
        (prob.narrow(1, 1, c - 1)?, onehot.narrow(1, 1, c - 1)?)
    };
    let intersection = (&prob * &onehot)?.sum(D::Minus1)?;
    let denominator = (prob.sum(D::Minus1)? + onehot.sum(D::Minus1)?)?;
    let dice = ((intersection * 2.0)? + opts.smooth_nr)?.div(&(denominator + opts.smooth_dr)?)?;
    let dice_loss = (1.0 - dice)?.mean_all()?;

    let total = ((dice_loss * opts.lambda_dice)? + (ce * opts.lambda_ce)?)?;
    Ok(total)
}

/// Voxels per partial sum: fixed, so the sums do not depend on the thread count.
const VOXELS_PER_PARTIAL: usize = 256;

/// Per-(batch, class) sums of the Dice term, `[Σp·g, Σp, Σg]` for each (b, c), and Σ −log p[t].
struct Sums {
    dice: Vec<[f64; 3]>,
    ce: f64,
}

/// The fused CPU DiceCE: x `[B, C, N]` → scalar; the labels travel with the op.
struct DiceCe {
    ids: Arc<Vec<u32>>,
    b: usize,
    c: usize,
    opts: DiceCeOptions,
    /// The forward's sums, for the backward.
    sums: Mutex<Option<Arc<Sums>>>,
}

/// Softmax over the classes of voxels `n0..n0+len` of one batch item, into `p` `[C × len]`
/// (class-major, as x is laid out). x is that item's `[C, N]`.
fn softmax_block<T: candle_core::WithDType>(x: &[T], n: usize, n0: usize, p: &mut [f64]) {
    let len = p.len() / (x.len() / n);
    let c = x.len() / n;
    let mut mx = vec![f64::NEG_INFINITY; len];
    for k in 0..c {
        for (m, v) in mx.iter_mut().zip(&x[k * n + n0..k * n + n0 + len]) {
            *m = m.max(v.to_f64());
        }
    }
    let mut sum = vec![0f64; len];
    for k in 0..c {
        let row = &mut p[k * len..(k + 1) * len];
        for (((e, v), m), s) in row
            .iter_mut()
            .zip(&x[k * n + n0..k * n + n0 + len])
            .zip(&mx)
            .zip(sum.iter_mut())
        {
            *e = (v.to_f64() - m).exp();
            *s += *e;
        }
    }
    for k in 0..c {
        for (e, s) in p[k * len..(k + 1) * len].iter_mut().zip(&sum) {
            *e /= s;
        }
    }
}

impl DiceCe {
    fn sums<T: candle_core::WithDType>(&self, x: &[T]) -> Sums {
        let (c, n) = (self.c, x.len() / (self.b * self.c));
        let blocks = n.div_ceil(VOXELS_PER_PARTIAL);
        let partial: Vec<(Vec<[f64; 3]>, f64)> = (0..self.b * blocks)
            .into_par_iter()
            .map(|task| {
                let (bb, blk) = (task / blocks, task % blocks);
                let n0 = blk * VOXELS_PER_PARTIAL;
                let len = VOXELS_PER_PARTIAL.min(n - n0);
                let xb = &x[bb * c * n..(bb + 1) * c * n];
                let ids = &self.ids[bb * n + n0..bb * n + n0 + len];
                let mut p = vec![0f64; c * len];
                softmax_block(xb, n, n0, &mut p);
                let mut dice = vec![[0f64; 3]; c];
                for (k, d) in dice.iter_mut().enumerate() {
                    d[1] = p[k * len..(k + 1) * len].iter().sum();
                }
                let mut ce = 0.0;
                for (j, &t) in ids.iter().enumerate() {
                    let t = t as usize;
                    if t < c {
                        let pt = p[t * len + j];
                        dice[t][0] += pt;
                        dice[t][2] += 1.0;
                        ce -= pt.ln();
                    }
                }
                (dice, ce)
            })
            .collect();
        let mut sums = Sums {
            dice: vec![[0f64; 3]; self.b * c],
            ce: 0.0,
        };
        for (task, (dice, ce)) in partial.into_iter().enumerate() {
            let bb = task / blocks;
            for (s, d) in sums.dice[bb * c..(bb + 1) * c].iter_mut().zip(dice) {
                for i in 0..3 {
                    s[i] += d[i];
                }
            }
            sums.ce += ce;
        }
        sums
    }

    /// First Dice channel (1 without the background).
    fn c0(&self) -> usize {
        usize::from(!self.opts.include_background)
    }

    fn loss(&self, s: &Sums, n: usize) -> f64 {
        let o = &self.opts;
        let per = self.c - self.c0();
        let mut dice = 0.0;
        for bb in 0..self.b {
            for [i, p, g] in &s.dice[bb * self.c + self.c0()..(bb + 1) * self.c] {
                dice += 1.0 - (2.0 * i + o.smooth_nr) / (p + g + o.smooth_dr);
            }
        }
        let dice = dice / (self.b * per) as f64;
        let ce = s.ce / (self.b * n) as f64;
        o.lambda_dice * dice + o.lambda_ce * ce
    }

    /// dL/dx `[B, C, N]` times the incoming gradient `gl`: with α, β per (b, c) such that
    /// dDice/dp = α·g + β, through the softmax, plus the cross-entropy's `(p − g)/(B·N)`.
    fn grad<T: candle_core::WithDType>(&self, x: &[T], s: &Sums, gl: f64) -> Vec<T> {
        let (c, n, o) = (self.c, x.len() / (self.b * self.c), &self.opts);
        let w = o.lambda_dice / (self.b * (c - self.c0())) as f64;
        let ab: Vec<[f64; 2]> = s
            .dice
            .iter()
            .enumerate()
            .map(|(i, &[int, p, g])| {
                if i % c < self.c0() {
                    return [0.0, 0.0];
                }
                let den = p + g + o.smooth_dr;
                [-2.0 * w / den, w * (2.0 * int + o.smooth_nr) / (den * den)]
            })
            .collect();
        let ce = o.lambda_ce / (self.b * n) as f64;
        let mut out = vec![T::zero(); x.len()];
        let blocks = n.div_ceil(VOXELS_PER_PARTIAL);
        // Tasks own disjoint voxel blocks of one batch item, across all classes.
        let op = crate::nn::SyncPtr(out.as_mut_ptr());
        (0..self.b * blocks).into_par_iter().for_each(|task| {
            let op = op;
            let (bb, blk) = (task / blocks, task % blocks);
            let n0 = blk * VOXELS_PER_PARTIAL;
            let len = VOXELS_PER_PARTIAL.min(n - n0);
            let xb = &x[bb * c * n..(bb + 1) * c * n];
            let ids = &self.ids[bb * n + n0..bb * n + n0 + len];
            let ab = &ab[bb * c..(bb + 1) * c];
            let mut p = vec![0f64; c * len];
            softmax_block(xb, n, n0, &mut p);
            // Σ_c p_c·(α_c·g_c + β_c) per voxel
            let mut dot = vec![0f64; len];
            for k in 0..c {
                for (d, &pk) in dot.iter_mut().zip(&p[k * len..(k + 1) * len]) {
                    *d += pk * ab[k][1];
                }
            }
            for (j, &t) in ids.iter().enumerate() {
                if (t as usize) < c {
                    dot[j] += p[t as usize * len + j] * ab[t as usize][0];
                }
            }
            for k in 0..c {
                for j in 0..len {
                    let pk = p[k * len + j];
                    let g = f64::from(ids[j] as usize == k);
                    let dp = ab[k][0] * g + ab[k][1];
                    // a voxel whose id matches no class has no cross-entropy term
                    let ce = if (ids[j] as usize) < c {
                        ce * (pk - g)
                    } else {
                        0.0
                    };
                    let v = gl * (pk * (dp - dot[j]) + ce);
                    // SAFETY: (bb, k, n0 + j) lies in this task's voxel block, written by it alone.
                    unsafe { *op.0.add((bb * c + k) * n + n0 + j) = T::from_f64(v) };
                }
            }
        });
        out
    }
}

impl candle_core::CustomOp1 for DiceCe {
    fn name(&self) -> &'static str {
        "dice-ce"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l.shape().elem_count() / (self.b * self.c);
        let (sums, out) = match slices(st, l, "dice-ce")? {
            Slice::F32(v) => {
                let s = self.sums(v);
                let loss = self.loss(&s, n);
                (s, CpuStorage::F32(vec![loss as f32]))
            }
            Slice::F64(v) => {
                let s = self.sums(v);
                let loss = self.loss(&s, n);
                (s, CpuStorage::F64(vec![loss]))
            }
        };
        *self.sums.lock().expect("dice-ce lock") = Some(Arc::new(sums));
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let sums = self.sums.lock().expect("dice-ce lock").clone();
        let Some(sums) = sums else {
            candle_core::bail!("dice-ce: backward before forward")
        };
        let gl = g.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let x = x.detach();
        let dx = match x.dtype() {
            DType::F32 => with_slice::<f32, _>(&x, "dice-ce", |v| self.grad(v, &sums, gl))
                .and_then(|d| Tensor::from_vec(d, x.shape(), x.device()))?,
            DType::F64 => with_slice::<f64, _>(&x, "dice-ce", |v| self.grad(v, &sums, gl))
                .and_then(|d| Tensor::from_vec(d, x.shape(), x.device()))?,
            _ => candle_core::bail!("dice-ce: f32/f64 logits only"),
        };
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Hand-computed: one voxel, two classes, logits (0, 0) → p = (½, ½), target 1.
    /// CE = ln 2; Dice_0 = 1 - 1e-5/(½ + 1e-5), Dice_1 = 1 - (1 + 1e-5)/(1.5 + 1e-5).
    #[test]
    fn single_voxel_by_hand() {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((1, 2, 1, 1, 1), DType::F64, &dev).unwrap();
        let labels = Tensor::ones((1, 1, 1, 1, 1), DType::U32, &dev).unwrap();
        let got = dice_ce_loss(&logits, &labels, &DiceCeOptions::default())
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let d0 = 1.0 - 1e-5 / (0.5 + 1e-5);
        let d1 = 1.0 - (1.0 + 1e-5) / (1.5 + 1e-5);
        let want = (d0 + d1) / 2.0 + 2f64.ln();
        assert!((got - want).abs() < 1e-12, "got {got}, want {want}");
    }

    /// The fused op against the tensor-op composite: value and gradient, both Dice variants,
    /// two batch items, 300 voxels (two partial-sum blocks), an id outside 0..C.
    #[test]
    fn fused_loss_equals_the_composite_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (b, c, n) = (2, 3, 300);
        let mut s = 7u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let logits: Vec<f64> = (0..b * c * n).map(|_| rnd() * 6.0 - 3.0).collect();
        let mut ids: Vec<u32> = (0..b * n).map(|_| (rnd() * 3.0) as u32).collect();
        ids[5] = 7;
        let logits = Tensor::from_vec(logits, (b, c, 10, 5, 6), &dev).unwrap();
        let labels = Tensor::from_vec(ids, (b, 1, 10, 5, 6), &dev).unwrap();
        // The fused CPU op, and the generic node (its backward from tensor ops).
        let cases = [true, false]
            .into_iter()
            .flat_map(|bg| [(bg, false), (bg, true)]);
        for (include_background, generic) in cases {
            fn path<R>(generic: bool, f: impl FnOnce() -> R) -> R {
                if generic {
                    crate::nn::with_generic_ops(f)
                } else {
                    f()
                }
            }
            let opts = DiceCeOptions {
                include_background,
                lambda_dice: 0.7,
                lambda_ce: 1.3,
                ..Default::default()
            };
            let var = candle_core::Var::from_tensor(&logits).unwrap();
            let fused = path(generic, || dice_ce_loss(var.as_tensor(), &labels, &opts)).unwrap();
            let x = var.as_tensor().flatten_from(2).unwrap();
            let ids = labels.flatten_from(2).unwrap();
            let reference = composite(&x, &ids, &opts, b, c, DType::F64).unwrap();
            let (f, r) = (
                fused.to_scalar::<f64>().unwrap(),
                reference.to_scalar::<f64>().unwrap(),
            );
            assert!((f - r).abs() < 1e-12, "{f} vs {r}");
            let gf = path(generic, || fused.backward()).unwrap();
            let gr = (reference * 2.0).unwrap().backward().unwrap();
            let (gf, gr) = (
                gf.get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
                gr.get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
            );
            // the composite's gradient was doubled: the incoming gradient is honoured
            let worst = gf
                .iter()
                .zip(&gr)
                .map(|(a, b)| (2.0 * a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                worst < 1e-14,
                "generic {generic}: gradient differs by {worst}"
            );
            assert!(gf.iter().any(|&v| v.abs() > 1e-6));
        }
    }

    #[test]
    fn label_shape_mismatch_is_an_error() {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((1, 2, 2, 2, 2), DType::F32, &dev).unwrap();
        let labels = Tensor::zeros((1, 1, 2, 2, 3), DType::U32, &dev).unwrap();
        let err = dice_ce_loss(&logits, &labels, &DiceCeOptions::default()).unwrap_err();
        assert!(
            err.to_string().contains("expected shape [1, 1, 2, 2, 2]"),
            "{err}"
        );
    }
}
