//! The SwinUNETR of [`crate::nn`] as a [`TrainModel`], and device choice.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::nn::ops::default_conv3d_kernel;
use crate::nn::{Conv3dKernel, SwinUnetr, SwinUnetrConfig};

use super::error::{param_err, Result, TrainError};
use super::model::{reseed_varmap, sorted_vars, TrainModel};

/// A SwinUNETR whose parameters are the `Var`s of a `VarMap`.
pub struct SwinModel {
    /// The network.
    pub net: SwinUnetr,
    /// Its parameters.
    pub varmap: VarMap,
}

impl SwinModel {
    /// A freshly initialised model, deterministic in `seed` on every device.
    ///
    /// nn's default Conv3d kernel sums its weight gradient in a fixed order,
    /// so a resumed run ends bitwise equal to an uninterrupted one on CPU.
    pub fn init(cfg: &SwinUnetrConfig, seed: u64, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let kernel: Arc<dyn Conv3dKernel> = default_conv3d_kernel();
        let net = SwinUnetr::with_kernel(cfg, vb, kernel).map_err(nn_err)?;
        reseed_varmap(&varmap, seed)?;
        Ok(SwinModel { net, varmap })
    }
}

impl TrainModel for SwinModel {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.net.forward(x).map_err(nn_err)
    }
    fn named_vars(&self) -> Vec<(String, Var)> {
        sorted_vars(&self.varmap)
    }
    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.net.backward(loss).map_err(nn_err)
    }
    fn frozen(&self) -> Result<Option<Box<dyn TrainModel>>> {
        let net = self.net.frozen().map_err(nn_err)?;
        Ok(Some(Box::new(Frozen(net))))
    }
}

/// An inference-only SwinUNETR loaded from disk.
pub struct Frozen(pub SwinUnetr);

impl TrainModel for Frozen {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x).map_err(nn_err)
    }
    fn named_vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
}

/// Converts an nn error into ours, keeping its message.
pub fn nn_err(e: crate::nn::Error) -> TrainError {
    match e {
        crate::nn::Error::Candle(c) => TrainError::Candle(c),
        other => TrainError::Param {
            param: "model".into(),
            message: other.to_string(),
        },
    }
}

/// `auto` (CUDA when built with it and present, else CPU), `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let cuda = |n: usize| {
        Device::new_cuda(n).map_err(|e| {
            param_err(
                "device",
                format!("`{spec}`: CUDA device {n} unavailable ({e})"),
            )
        })
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        // A CUDA build on a machine without a driver or GPU runs on the CPU: `cuda_is_available`
        // only says how the binary was built, so try the device and fall back.
        "auto" => Ok(if candle_core::utils::cuda_is_available() {
            Device::new_cuda(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        "cuda" => cuda(0),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => cuda(n),
            None => Err(param_err(
                "device",
                format!("expected auto, cpu, cuda or cuda:N, found `{s}`"),
            )),
        },
    }
}
