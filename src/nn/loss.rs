//! MONAI's `DiceCELoss(to_onehot_y=True, softmax=True)` with its defaults (monai/losses/dice.py):
//! soft Dice per (batch, class) with smooth 1e-5 on both sides, averaged, plus mean cross-entropy
//! over all voxels.

use candle_core::{DType, Result, Tensor, D};

/// DiceCE loss of logits `[B,C,D,H,W]` against integer labels `[B,1,D,H,W]` (any integer or
/// float dtype holding class ids), as a scalar tensor.
pub fn dice_ce_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, c, d, h, w) = logits.dims5()?;
    let m = d * h * w;
    // [B,C,D,H,W] -> [B,C,M]
    let z = logits.reshape((b, c, m))?;
    let logp = candle_nn::ops::log_softmax(&z, 1)?;
    let p = logp.exp()?;
    // one-hot [B,C,M] from [B,1,M]
    let lab = labels.reshape((b, 1, m))?.to_dtype(DType::U32)?;
    let classes = Tensor::arange(0u32, c as u32, logits.device())?.reshape((1, c, 1))?;
    let onehot = lab.broadcast_eq(&classes)?.to_dtype(logits.dtype())?;
    // Dice: 1 - (2Σpg + s)/(Σp + Σg + s) per (b,c), mean over B×C (dice.py:195-218)
    let smooth = 1e-5;
    let inter = (&p * &onehot)?.sum(D::Minus1)?;
    let denom = (p.sum(D::Minus1)? + onehot.sum(D::Minus1)?)?;
    let dice = (1.0 - ((inter * 2.0)? + smooth)?.div(&(denom + smooth)?)?)?.mean_all()?;
    // CE: -mean over voxels of log p[label]
    let ce = (logp * onehot)?.sum(1)?.mean_all()?.neg()?;
    dice + ce
}
