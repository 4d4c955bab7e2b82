//! Learning-rate schedules and gradient clipping.
//!
//! The seed recipe (ts_distill) uses a constant learning rate; MONAI's
//! research SwinUNETR (`research-contributions/SwinUNETR/BTCV/optimizers/
//! lr_scheduler.py`, `LinearWarmupCosineAnnealingLR`) uses a linear warm-up
//! from `warmup_start_lr` to the base rate over `warmup` steps, then a
//! half cosine down to `eta_min` at `total` steps. Its closed form is used
//! here per iteration (the research code steps it per epoch).

use candle_core::{backprop::GradStore, Var};

use super::error::{param_err, Result};

/// A learning-rate schedule over iterations.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The base rate throughout (the seed recipe).
    Constant,
    /// Linear warm-up then cosine annealing.
    WarmupCosine {
        /// Iterations of linear warm-up.
        warmup: usize,
        /// Rate at iteration 0 of the warm-up.
        #[serde(default)]
        warmup_start_lr: f64,
        /// Rate reached at the end.
        #[serde(default)]
        eta_min: f64,
    },
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule::Constant
    }
}

impl LrSchedule {
    /// The learning rate at `iteration` (0-based) of `total`.
    pub fn lr(&self, base: f64, iteration: usize, total: usize) -> f64 {
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::WarmupCosine {
                warmup,
                warmup_start_lr,
                eta_min,
            } => {
                if iteration < warmup {
                    if warmup <= 1 {
                        return warmup_start_lr;
                    }
                    warmup_start_lr
                        + iteration as f64 * (base - warmup_start_lr) / (warmup - 1) as f64
                } else {
                    let span = total.saturating_sub(warmup).max(1) as f64;
                    let t = (iteration - warmup) as f64 / span;
                    eta_min + 0.5 * (base - eta_min) * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
        }
    }

    /// Checks the schedule against the run length.
    pub fn validate(&self, total: usize) -> Result<()> {
        if let LrSchedule::WarmupCosine { warmup, .. } = self {
            if *warmup >= total {
                return Err(param_err(
                    "schedule.warmup",
                    format!("must be below `iterations` ({total}), found {warmup}"),
                ));
            }
        }
        Ok(())
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`,
/// applied only when below 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for v in vars {
            if let Some(g) = grads.get(v) {
                let scaled = (g * coef)?;
                grads.insert(v, scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of the research code's closed form, by hand: warm-up 0 → 1e-4
    /// over 5 steps (step 1e-4/4), cosine over the remaining 10.
    #[test]
    fn warmup_cosine_by_hand() {
        let s = LrSchedule::WarmupCosine {
            warmup: 5,
            warmup_start_lr: 0.0,
            eta_min: 0.0,
        };
        assert_eq!(s.lr(1e-4, 0, 15), 0.0);
        assert!((s.lr(1e-4, 2, 15) - 5e-5).abs() < 1e-18);
        assert!((s.lr(1e-4, 5, 15) - 1e-4).abs() < 1e-18);
        assert!((s.lr(1e-4, 10, 15) - 5e-5).abs() < 1e-12);
        assert!(s.lr(1e-4, 15, 15).abs() < 1e-18);
        assert_eq!(LrSchedule::Constant.lr(1e-4, 7, 15), 1e-4);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let dev = candle_core::Device::Cpu;
        let a = Var::new(&[3f32, 0.0], &dev).unwrap();
        let b = Var::new(&[0f32, 4.0], &dev).unwrap();
        let loss = ((a.as_tensor() * a.as_tensor()).unwrap().sum_all().unwrap()
            + (b.as_tensor() * b.as_tensor()).unwrap().sum_all().unwrap())
        .unwrap();
        // grads 2a = (6, 0), 2b = (0, 8): norm 10.
        let mut g = loss.backward().unwrap();
        let vars = [a.clone(), b.clone()];
        let norm = clip_grad_norm(&mut g, &vars, 1.0).unwrap();
        assert!((norm - 10.0).abs() < 1e-6);
        let ga = g.get(&a).unwrap().to_vec1::<f32>().unwrap();
        let gb = g.get(&b).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (ga[0] - 0.6).abs() < 1e-6 && (gb[1] - 0.8).abs() < 1e-6,
            "{ga:?} {gb:?}"
        );
    }
}
