//! AdamW with exportable state, so a checkpoint can resume training bitwise.
//!
//! The update is `torch.optim.AdamW`'s (and `candle_nn::AdamW`'s, whose
//! moments are private and so cannot be checkpointed):
//! `θ ← θ·(1 − lr·wd)`, `m ← β1·m + (1 − β1)·g`, `v ← β2·v + (1 − β2)·g²`,
//! `θ ← θ − lr·(m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + ε)`.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Tensor, Var};

use super::error::{Result, TrainError};

/// AdamW hyper-parameters; `Default` is the seed recipe (lr 1e-4, wd 1e-5,
/// β 0.9/0.999, ε 1e-8).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// Base learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            weight_decay: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// AdamW over named variables.
pub struct AdamW {
    vars: Vec<(String, Var, Var, Var)>,
    step: usize,
    /// Hyper-parameters; `lr` may be changed between steps by a schedule.
    pub config: AdamWConfig,
}

impl AdamW {
    /// Zero moments for every float variable, in the given (name) order.
    pub fn new(named: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let vars = named
            .into_iter()
            .filter(|(_, v)| v.dtype().is_float())
            .map(|(n, v)| {
                let m = Var::zeros(v.shape(), v.dtype(), v.device())?;
                let s = Var::zeros(v.shape(), v.dtype(), v.device())?;
                Ok((n, v, m, s))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            vars,
            step: 0,
            config,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The variables, for gradient clipping.
    pub fn vars(&self) -> Vec<Var> {
        self.vars.iter().map(|(_, v, _, _)| v.clone()).collect()
    }

    /// One update from `grads`; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let scale_m = 1.0 / (1.0 - c.beta1.powi(self.step as i32));
        let scale_v = 1.0 / (1.0 - c.beta2.powi(self.step as i32));
        for (_, theta, m, v) in &self.vars {
            let Some(g) = grads.get(theta) else { continue };
            let next_m = ((m.as_tensor() * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let next_v = ((v.as_tensor() * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&next_v * scale_v)?.sqrt()? + c.eps)?;
            let update = ((&next_m * scale_m)?.div(&denom)? * c.lr)?;
            let decayed = (theta.as_tensor() * (1.0 - c.lr * c.weight_decay))?;
            theta.set(&(decayed - update)?)?;
            m.set(&next_m)?;
            v.set(&next_v)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<name>`, `v.<name>`) plus the step
    /// count, for a checkpoint.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (n, _, m, v) in &self.vars {
            out.insert(format!("m.{n}"), m.as_tensor().copy()?);
            out.insert(format!("v.{n}"), v.as_tensor().copy()?);
        }
        let dev = self.vars.first().map(|(_, v, _, _)| v.device().clone());
        let dev = dev.unwrap_or(candle_core::Device::Cpu);
        out.insert("step".into(), Tensor::new(&[self.step as u32], &dev)?);
        Ok(out)
    }

    /// Restores [`AdamW::state`]; every moment must be present with the right shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let missing = |k: &str| TrainError::BadFile {
            path: "optimizer state".into(),
            message: format!("expected tensor `{k}`, not found"),
        };
        for (n, theta, m, v) in &self.vars {
            for (key, dst) in [(format!("m.{n}"), m), (format!("v.{n}"), v)] {
                let t = state.get(&key).ok_or_else(|| missing(&key))?;
                if t.dims() != theta.dims() {
                    return Err(TrainError::Shape {
                        what: format!("optimizer state `{key}`"),
                        expected: theta.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                dst.set(&t.to_device(theta.device())?.to_dtype(theta.dtype())?)?;
            }
        }
        let step = state.get("step").ok_or_else(|| missing("step"))?;
        self.step = step
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1::<u32>()?[0] as usize;
        Ok(())
    }
}
