//! What the training loop needs from a model, and seeded initialisation.
//!
//! Candle's CPU random generator cannot be seeded (`CpuDevice::set_seed`
//! bails), so a model initialised through `VarBuilder::from_varmap` differs
//! on every run. [`reseed_varmap`] redraws every parameter from a ChaCha
//! stream keyed by the seed and the parameter name, with PyTorch's default
//! distributions as MONAI uses them (swinunetr-candle.md §1.7): constants
//! stay constants (LayerNorm 1/0), `relative_position_bias_table` is
//! N(0, 0.02), every other weight is U(±1/√fan_in) with
//! fan_in = dims[1]·∏dims[2..] (Linear `[out, in]`, Conv `[out, in, k…]`,
//! ConvTranspose `[in, out, k…]`), and a bias uses its sibling weight's fan_in.
//! The first draw is kept only to check that the rule fits (its values must
//! lie within the bound), so a model whose init changes is caught.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::error::{Result, TrainError};

/// A segmentation network the trainer can drive.
pub trait TrainModel {
    /// Logits [B, C_out, D, H, W] for images [B, C_in, D, H, W].
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// Every trainable variable under a stable name, sorted by name.
    fn named_vars(&self) -> Vec<(String, Var)>;
    /// Gradients of `loss` (a model that recomputes blocks in backward hands theirs out here).
    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        Ok(loss.backward()?)
    }
    /// A copy without autograd that sees the same (later updated) parameters, for validation;
    /// `None` where [`TrainModel::forward`] plus a detach is as good.
    fn frozen(&self) -> Result<Option<Box<dyn TrainModel>>> {
        Ok(None)
    }
}

/// The variables of a `VarMap`, sorted by name.
pub fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap lock");
    let sorted: BTreeMap<String, Var> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    sorted.into_iter().collect()
}

/// Redraws every variable of `varmap` deterministically from `seed` (see the
/// module doc for the distributions).
pub fn reseed_varmap(varmap: &VarMap, seed: u64) -> Result<()> {
    let vars = sorted_vars(varmap);
    let shapes: BTreeMap<String, Vec<usize>> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    for (name, var) in &vars {
        let current = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?;
        let values = current.to_vec1::<f64>()?;
        if values.windows(2).all(|w| w[0] == w[1]) {
            continue; // constant init (LayerNorm weight 1, bias 0): nothing random
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(name_stream(name));
        let n = values.len();
        let drawn: Vec<f32> = if name.ends_with("relative_position_bias_table") {
            (0..n).map(|_| (normal(&mut rng) * 0.02) as f32).collect()
        } else {
            let fan_in = fan_in(name, &shapes).ok_or_else(|| TrainError::Param {
                param: "model init".into(),
                message: format!(
                    "cannot tell the fan-in of parameter `{name}` {:?}",
                    var.dims()
                ),
            })?;
            let bound = 1.0 / (fan_in as f64).sqrt();
            let seen = values.iter().fold(0f64, |m, v| m.max(v.abs()));
            if seen > bound * (1.0 + 1e-6) {
                return Err(TrainError::Param {
                    param: "model init".into(),
                    message: format!(
                        "parameter `{name}`: expected U(±{bound:.4}) init, found |value| {seen:.4}"
                    ),
                });
            }
            (0..n)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect()
        };
        let t = Tensor::from_vec(drawn, var.dims(), &candle_core::Device::Cpu)?;
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn fan_in(name: &str, shapes: &BTreeMap<String, Vec<usize>>) -> Option<usize> {
    let dims = &shapes[name];
    if dims.len() >= 2 {
        return Some(dims[1] * dims[2..].iter().product::<usize>());
    }
    let sibling = name.strip_suffix("bias").map(|p| format!("{p}weight"))?;
    let w = shapes.get(&sibling)?;
    (w.len() >= 2).then(|| w[1] * w[2..].iter().product::<usize>())
}

/// A stable 64-bit stream id for a parameter name (FNV-1a).
fn name_stream(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A standard normal draw (Box–Muller).
fn normal<R: Rng>(rng: &mut R) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
