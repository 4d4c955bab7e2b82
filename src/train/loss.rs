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
//! Candle trap: `candle_nn::ops::softmax_last_dim` has no backward, so the
//! softmax is built here from `exp`/`sum` (which have one), with the
//! per-voxel max subtracted for stability. The max is detached: subtracting
//! a constant does not change the softmax, so its gradient is exactly zero
//! and need not be traced.

use candle_core::{DType, Tensor, D};

use super::error::{Result, TrainError};

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
    // [B, 1, N] class ids as u32, then one-hot [B, C, N] by comparing with 0..C.
    let ids = labels
        .flatten_from(2)?
        .to_dtype(DType::F32)?
        .to_dtype(DType::U32)?;
    let classes = Tensor::arange(0u32, c as u32, logits.device())?.reshape((1, c, 1))?;
    let onehot = ids.broadcast_eq(&classes)?.to_dtype(dtype)?;

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
